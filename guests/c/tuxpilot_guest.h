/* TuxPilot's WebAssembly guest ABI (version 1) for C plugins: write `tp_handle`, include this header in
 * exactly one file, build with Debian's clang and wasi-libc:
 *
 *   clang --target=wasm32-wasi -mexec-model=reactor -O2 -I guests/c -o plugin.wasm plugin.c
 *
 *   void tp_handle(const tp_request *req) {
 *       char mount[256];
 *       if (tp_is_action(req, "hello") && tp_get_string(req->params, "name", mount, sizeof mount))
 *           tp_reply_okf("{\"hi\": %s}", tp_quote(mount));
 *       else tp_reply_error("unknown_action", "no such action");
 *   }
 *
 * The host writes one JSON request into memory from `tuxpilot_alloc`, calls `tuxpilot_call`, and reads the
 * reply this header built. Lookups (`tp_get_*`) find the first `"key":` in the given JSON text: enough for
 * flat params; pass a sub-object's text (tp_get_object) to look deeper. */
#ifndef TUXPILOT_GUEST_H
#define TUXPILOT_GUEST_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int is_event;        /* 0: an action request, 1: an event */
    char action[65];     /* the action's name (actions only) */
    const char *params;  /* the params object's JSON text, NUL-terminated (actions) */
    const char *event;   /* the event document's JSON text (events) */
    const char *config;  /* the plugin's settings, JSON text */
    const char *raw;     /* the whole request */
} tp_request;

void tp_handle(const tp_request *req);

static char *tp__reply;
static size_t tp__reply_len;
static char *tp__proposals; /* "[...]" being built, for events */

static int tp_is_action(const tp_request *req, const char *name) {
    return !req->is_event && strcmp(req->action, name) == 0;
}

static const char *tp__skip_ws(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
    return p;
}

/* The value's text after "key": in json, or NULL. */
static const char *tp__find(const char *json, const char *key) {
    size_t klen = strlen(key);
    for (const char *p = json; p && *p; p++) {
        p = strchr(p, '"');
        if (!p) return NULL;
        if (strncmp(p + 1, key, klen) == 0 && p[klen + 1] == '"') {
            const char *q = tp__skip_ws(p + klen + 2);
            if (*q == ':') return tp__skip_ws(q + 1);
        }
    }
    return NULL;
}

/* The end of the JSON value starting at p (one past it). */
static const char *tp__value_end(const char *p) {
    if (*p == '"') {
        for (p++; *p && *p != '"'; p++) if (*p == '\\' && p[1]) p++;
        return *p ? p + 1 : p;
    }
    if (*p == '{' || *p == '[') {
        int depth = 0;
        for (; *p; p++) {
            if (*p == '"') { p = tp__value_end(p) - 1; continue; }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') { if (--depth == 0) return p + 1; }
        }
        return p;
    }
    while (*p && *p != ',' && *p != '}' && *p != ']') p++;
    return p;
}

/* A string value, unescaped (\" \\ \n \t only; others kept as is) into out; 1 if found. */
static int tp_get_string(const char *json, const char *key, char *out, size_t cap) {
    const char *p = json ? tp__find(json, key) : NULL;
    if (!p || *p != '"' || cap == 0) return 0;
    size_t n = 0;
    for (p++; *p && *p != '"' && n + 1 < cap; p++) {
        char c = *p;
        if (c == '\\' && p[1]) { p++; c = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p; }
        out[n++] = c;
    }
    out[n] = 0;
    return 1;
}

static int tp_get_number(const char *json, const char *key, double *out) {
    const char *p = json ? tp__find(json, key) : NULL;
    if (!p || !(*p == '-' || (*p >= '0' && *p <= '9'))) return 0;
    *out = strtod(p, NULL);
    return 1;
}

/* A sub-document's JSON text (object, array or any value), malloc'ed; NULL if absent. */
static char *tp_get_object(const char *json, const char *key) {
    const char *p = json ? tp__find(json, key) : NULL;
    if (!p) return NULL;
    size_t n = (size_t)(tp__value_end(p) - p);
    char *out = malloc(n + 1);
    memcpy(out, p, n);
    out[n] = 0;
    return out;
}

/* s as a JSON string literal, malloc'ed (freed with the reply). */
static char *tp_quote(const char *s) {
    size_t n = strlen(s), k = 0;
    char *out = malloc(n * 6 + 3);
    out[k++] = '"';
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { out[k++] = '\\'; out[k++] = (char)c; }
        else if (c < 0x20) k += (size_t)sprintf(out + k, "\\u%04x", c);
        else out[k++] = (char)c;
    }
    out[k++] = '"';
    out[k] = 0;
    return out;
}

static void tp__set(char *text) {
    free(tp__reply);
    tp__reply = text;
    tp__reply_len = strlen(text);
}

static char *tp__vformat(const char *fmt, va_list ap) {
    va_list again;
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    char *out = malloc((size_t)n + 1);
    vsnprintf(out, (size_t)n + 1, fmt, again);
    va_end(again);
    return out;
}

/* The action's result data, as JSON text built printf-style. */
static void tp_reply_okf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *data = tp__vformat(fmt, ap);
    va_end(ap);
    char *text = malloc(strlen(data) + 8);
    sprintf(text, "{\"ok\":%s}", data);
    free(data);
    tp__set(text);
}

static void tp_reply_error(const char *code, const char *message) {
    char *c = tp_quote(code), *m = tp_quote(message);
    char *text = malloc(strlen(c) + strlen(m) + 32);
    sprintf(text, "{\"error\":{\"code\":%s,\"message\":%s}}", c, m);
    free(c);
    free(m);
    tp__set(text);
}

/* Propose one of the plugin's own actions (in an event handler); params is JSON text. */
static void tp_propose(const char *action, const char *params_json, const char *reason) {
    char *a = tp_quote(action), *r = tp_quote(reason ? reason : "");
    size_t old = tp__proposals ? strlen(tp__proposals) : 0;
    char *next = malloc(old + strlen(a) + strlen(r) + strlen(params_json) + 48);
    sprintf(next, "%s%s{\"action\":%s,\"params\":%s,\"reason\":%s}", old ? tp__proposals : "", old ? "," : "", a,
            params_json, r);
    free(tp__proposals);
    free(a);
    free(r);
    tp__proposals = next;
}

__attribute__((export_name("tuxpilot_alloc"))) void *tuxpilot_alloc(int32_t len) {
    return malloc((size_t)len + 1); /* +1: the request gets a NUL terminator */
}

__attribute__((export_name("tuxpilot_call"))) int64_t tuxpilot_call(char *ptr, int32_t len) {
    ptr[len] = 0;
    tp_request req;
    memset(&req, 0, sizeof req);
    req.raw = ptr;
    char kind[16] = "";
    tp_get_string(ptr, "kind", kind, sizeof kind);
    req.is_event = strcmp(kind, "event") == 0;
    tp_get_string(ptr, "action", req.action, sizeof req.action);
    char *params = tp_get_object(ptr, "params"), *event = tp_get_object(ptr, "event");
    char *config = tp_get_object(ptr, "config");
    req.params = params ? params : "{}";
    req.event = event ? event : "{}";
    req.config = config ? config : "{}";
    free(tp__proposals);
    tp__proposals = NULL;
    tp__set(strdup("{\"error\":{\"code\":\"internal\",\"message\":\"the handler set no reply\"}}"));
    if (req.is_event) tp__set(strdup("{\"propose\":[]}"));
    tp_handle(&req);
    if (req.is_event && tp__proposals) {
        char *text = malloc(strlen(tp__proposals) + 16);
        sprintf(text, "{\"propose\":[%s]}", tp__proposals);
        tp__set(text);
    }
    free(params);
    free(event);
    free(config);
    free(ptr);
    return ((int64_t)(uintptr_t)tp__reply << 32) | (int64_t)tp__reply_len;
}

#endif
