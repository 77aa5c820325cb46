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

/* Where to copy the output of one named tensor (the last block's hidden states). */
struct pipeinfer_capture {
    char name[64];
    void *dest;
    size_t capacity;
    size_t nbytes;
};

/* ggml_backend_sched_eval_callback: ask for the named tensor only, copy it out, then stop the graph
 * (returning false skips the output norm and the vocabulary projection, which nobody needs). */
bool pipeinfer_capture_cb(struct ggml_tensor *tensor, bool ask, void *user_data) {
    struct pipeinfer_capture *capture = user_data;
    bool match = strcmp(ggml_get_name(tensor), capture->name) == 0;
    if (ask || !match) {
        return ask ? match : true;
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
