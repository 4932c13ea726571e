/* The conformance plugin in C, compiled to WebAssembly: the behaviour ../plugin.toml describes. Its
 * counters live across calls because the suite's manifest keeps the instance (sandbox_keep_state). */
#include <time.h>
#include "tuxpilot_guest.h"

#define SLOTS 512

static struct { char key[80]; int n; } runs[SLOTS], deliveries[SLOTS];

static int bump(typeof(runs) table, const char *key) {
    for (int i = 0; i < SLOTS; i++) {
        if (table[i].key[0] == 0) strncpy(table[i].key, key, sizeof table[i].key - 1);
        if (strcmp(table[i].key, key) == 0) return ++table[i].n;
    }
    return 1;
}

static void on_event(const tp_request *req) {
    char id[80] = "", type[160] = "";
    tp_get_string(req->event, "id", id, sizeof id);
    tp_get_string(req->event, "type", type, sizeof type);
    char *data = tp_get_object(req->event, "data");
    int delivery = bump(deliveries, id);
    const char *name = strchr(type, '.') ? strchr(type, '.') + 1 : type;
    double fail = 0, hold_s = 0;
    tp_get_number(data, "fail", &fail);
    tp_get_number(data, "hold_s", &hold_s);
    free(data);
    if (strcmp(name, "quiet") == 0) return;
    if (strcmp(name, "flaky") == 0 && delivery <= (int)fail) {
        tp_reply_error("internal", "failing delivery on request");
        return;
    }
    if (strcmp(name, "hold") == 0 && delivery == 1 && hold_s > 0) {
        struct timespec ts = {(time_t)hold_s, (long)((hold_s - (double)(time_t)hold_s) * 1e9)};
        nanosleep(&ts, NULL);
    }
    char params[160], reason[40];
    char *text = tp_quote(id);
    snprintf(params, sizeof params, "{\"text\":%s,\"n\":%d}", text, delivery < 10 ? delivery : 10);
    snprintf(reason, sizeof reason, "delivery %d", delivery);
    free(text);
    tp_propose("echo", params, reason);
}

void tp_handle(const tp_request *req) {
    if (req->is_event) {
        on_event(req);
    } else if (tp_is_action(req, "echo")) {
        tp_reply_okf("%s", req->params);
    } else if (tp_is_action(req, "count")) {
        char key[80] = "";
        tp_get_string(req->params, "key", key, sizeof key);
        char *quoted = tp_quote(key);
        tp_reply_okf("{\"runs\":%d,\"key\":%s}", bump(runs, key), quoted);
        free(quoted);
    } else if (tp_is_action(req, "fail")) {
        char code[80] = "", message[256] = "";
        tp_get_string(req->params, "code", code, sizeof code);
        tp_get_string(req->params, "message", message, sizeof message);
        tp_reply_error(code, message);
    } else if (tp_is_action(req, "crash")) {
        __builtin_trap(); /* what a bug looks like in a guest: a trap, answered plugin_fault */
    } else if (tp_is_action(req, "big")) {
        double bytes = 0;
        tp_get_number(req->params, "bytes", &bytes);
        size_t n = (size_t)bytes;
        char *blob = malloc(n + 1);
        memset(blob, 'x', n);
        blob[n] = 0;
        tp_reply_okf("{\"blob\":\"%s\"}", blob);
        free(blob);
    } else {
        tp_reply_error("unknown_action", req->action);
    }
}
