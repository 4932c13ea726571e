/* {{description}}
 * {{name}}'s guest in C, compiled to WebAssembly by build.sh. The host (wasmtime inside a TuxPilot plugin
 * process) checks params against plugin.toml before calling, and turns the replies built here into the
 * protocol's `result` and `error` documents. include/tuxpilot_guest.h is the ABI helper. */
#include "tuxpilot_guest.h"

static void on_event(const tp_request *req) {
    char type[160] = "", name[65] = "", params[160], reason[200];
    double value = 0;
    tp_get_string(req->event, "type", type, sizeof type);
    /* The event's resource (a mount, a service…), else its host. */
    if (!tp_get_string(req->event, "resource", name, sizeof name)) tp_get_string(req->event, "host", name, sizeof name);
    tp_get_number(req->event, "value", &value);
    char *quoted = tp_quote(name);
    snprintf(params, sizeof params, "{\"name\":%s}", quoted);
    snprintf(reason, sizeof reason, "%s at %g", type, value);
    free(quoted);
    tp_propose("hello", params, reason); /* a proposal: the host's gate checks it first */
}

void tp_handle(const tp_request *req) {
    if (req->is_event) {
        on_event(req);
    } else if (tp_is_action(req, "hello")) {
        char name[65] = "world";
        tp_get_string(req->params, "name", name, sizeof name);
        if (strcmp(name, "nobody") == 0) {
            tp_reply_error("not_found", "no one to greet"); /* an `error` reply, 404 */
            return;
        }
        char *text = malloc(strlen(name) + 8);
        sprintf(text, "hello %s", name);
        char *quoted_text = tp_quote(text);
        tp_reply_okf("{\"text\":%s}", quoted_text); /* -> {"status": "ok", "data": {...}} */
        free(text);
        free(quoted_text);
    } else {
        tp_reply_error("unknown_action", req->action);
    }
}
