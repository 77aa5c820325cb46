/* Two llama.cpp callbacks that run without Python.
 *
 * llama.cpp calls both once per graph node (hundreds of times per decode); as Python callbacks they
 * take the GIL each time, which measured 0.6 ms per token on SmolLM2. Built on first use by
 * pipeinfer_cpu/native/__init__.py with the system C compiler; Python versions are the fallback.
 */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

struct ggml_tensor;
const char *ggml_get_name(const struct ggml_tensor *tensor);
size_t ggml_nbytes(const struct ggml_tensor *tensor);
void ggml_backend_tensor_get(const struct ggml_tensor *tensor, void *data, size_t offset, size_t size);
void ggml_backend_tensor_set(struct ggml_tensor *tensor, const void *data, size_t offset, size_t size);

/* Where to copy the output of one named tensor (the last block's hidden states; name "" for none),
 * and which tensor to overwrite with the stage's input (gemma's scaled input; input_name "" for none). */
struct pipeinfer_capture {
    char name[64];
    void *dest;
    size_t capacity;
    size_t nbytes;
    char input_name[64];
    const void *input;
    size_t input_nbytes;
    size_t written;
};

/* ggml_backend_sched_eval_callback: ask for the named tensors only. The input one is overwritten
 * once computed, before any node reads it; the output one is copied out, then the graph stops
 * (returning false skips the output norm and the vocabulary projection, which nobody needs). */
bool pipeinfer_capture_cb(struct ggml_tensor *tensor, bool ask, void *user_data) {
    struct pipeinfer_capture *capture = user_data;
    const char *name = ggml_get_name(tensor);
    bool output = capture->name[0] && strcmp(name, capture->name) == 0;
    bool input = capture->input_name[0] && strcmp(name, capture->input_name) == 0;
    if (ask) {
        return output || input;
    }
    if (input && ggml_nbytes(tensor) == capture->input_nbytes) {
        ggml_backend_tensor_set(tensor, capture->input, 0, capture->input_nbytes);
        capture->written = capture->input_nbytes;
    }
    if (!output) {
        return true;
    }
    size_t n = ggml_nbytes(tensor);
    if (n > capture->capacity) {
        n = capture->capacity;
    }
    ggml_backend_tensor_get(tensor, capture->dest, 0, n);
    capture->nbytes = n;
    return false;
}

/* ggml_abort_callback: abort when the flag byte another thread sets is non-zero. */
bool pipeinfer_flag_set(void *flag) {
    return *(volatile const char *)flag != 0;
}
