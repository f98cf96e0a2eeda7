// Logits of a token sequence from a GGUF file through llama.cpp's libllama, for tests/test_gguf_hybrid.py
// (opt-in: EMO_LLAMA_CPP names a llama.cpp checkout with build/bin/libllama.so). The first N_PROMPT
// tokens go in one batch (a row per token), the rest one at a time (decode through the recurrent state
// and KV cache). KV cache in float32, one thread. Prints one line of n_vocab logits per token.
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * ud) { (void)level; (void)text; (void)ud; }

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: logits MODEL N_PROMPT ID...\n"); return 2; }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64; cp.n_batch = 64; cp.n_ubatch = 64; cp.n_threads = 1; cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; cp.n_threads_batch = 1;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); return 1; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    int n_prompt = atoi(argv[2]), n = argc - 3;
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int pos = 0; pos < n; ) {
        int len = pos == 0 ? n_prompt : 1;
        b.n_tokens = len;
        for (int j = 0; j < len; j++) {
            b.token[j] = atoi(argv[3 + pos + j]); b.pos[j] = pos + j; b.n_seq_id[j] = 1; b.seq_id[j][0] = 0; b.logits[j] = 1;
        }
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
        for (int j = 0; j < len; j++) {
            float * l = llama_get_logits_ith(ctx, j);
            for (int v = 0; v < n_vocab; v++) printf("%.7g%c", l[v], v + 1 < n_vocab ? ' ' : '\n');
        }
        pos += len;
    }
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
