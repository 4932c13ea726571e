/* A C guest that tries what a sandboxed plugin must not do unless granted: read and write files, read
 * its environment and arguments. */
#include <errno.h>
#include <unistd.h>
#include "tuxpilot_guest.h"

extern char **environ;

void tp_handle(const tp_request *req) {
    char path[512] = "", text[256] = "";
    tp_get_string(req->params, "path", path, sizeof path);
    if (tp_is_action(req, "read")) {
        FILE *f = fopen(path, "r");
        if (!f) { tp_reply_error("not_found", strerror(errno)); return; }
        size_t n = fread(text, 1, sizeof text - 1, f);
        text[n] = 0;
        fclose(f);
        tp_reply_okf("{\"text\":%s}", tp_quote(text));
    } else if (tp_is_action(req, "write")) {
        tp_get_string(req->params, "text", text, sizeof text);
        FILE *f = fopen(path, "w");
        if (!f) { tp_reply_error("forbidden", strerror(errno)); return; }
        fputs(text, f);
        fclose(f);
        tp_reply_okf("{\"written\":%d}", (int)strlen(text));
    } else if (tp_is_action(req, "env")) {
        int n = 0;
        for (char **e = environ; e && *e; e++) n++;
        tp_reply_okf("{\"environ\":%d,\"home\":%s}", n, getenv("HOME") ? "true" : "false");
    } else if (req->is_event) {
        tp_propose("read", "{\"path\":\"/etc/hostname\"}", "an event came");
    } else {
        tp_reply_error("unknown_action", req->action);
    }
}
