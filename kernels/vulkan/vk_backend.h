// The Vulkan backend of the quantized matmul: one process-wide device context, weights uploaded
// once into device-local buffers, and a synchronous y = x @ W.T per call (activations in,
// results out through host-visible staging buffers). Used by the `hierarchos_vulkan` module.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace hkvk {

enum class Format : int { INT4 = 0, Q4_0 = 1, Q8_0 = 2, Q2_K = 3 };
constexpr int kNumFormats = 4;

const char *format_name(Format f);
int format_block_size(Format f);   // elements per block
int format_block_bytes(Format f);  // bytes per block

struct DeviceInfo {
    std::string name, type, api_version, driver;
    uint64_t max_storage_buffer_range = 0;
    bool timestamps = false;
    std::string rows;  // matmul.comp's work split: "workgroup" or "invocation" per output row
};

// Opens the loader (libvulkan.so.1 / vulkan-1.dll, found at run time, so a build with Vulkan
// still imports on a machine without it), picks a device and builds the pipelines, once.
// Returns "" when ready, else the one-line reason it is not.
const std::string &init_status();
DeviceInfo device_info();  // throws std::runtime_error when init_status() is not ""

class Weight {
public:
    // data: rows * (cols / block) blocks of the format, exactly the CPU kernel's bytes.
    Weight(Format format, const uint8_t *data, int64_t rows, int64_t cols);
    ~Weight();
    Weight(const Weight &) = delete;
    Weight &operator=(const Weight &) = delete;

    // y (n, rows) = x (n, cols) @ W.T; blocks until the device is done. Thread-safe.
    void matmul(const float *x, int64_t n, float *y) const;

    Format format() const { return format_; }
    int64_t rows() const { return rows_; }
    int64_t cols() const { return cols_; }
    int64_t nbytes() const { return nbytes_; }

private:
    Format format_;
    int64_t rows_, cols_, nbytes_;
    struct Buffer;
    std::unique_ptr<Buffer> buffer_;
};

// Seconds the device spent in the last matmul's dispatch, from timestamp queries (NaN when the
// queue has no timestamps): the kernel alone, without the copies and the submit round trip.
double last_dispatch_seconds();

}  // namespace hkvk
