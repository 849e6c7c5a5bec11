// The Vulkan matmul (see vk_backend.h): weights uploaded once into device-local buffers, and per
// call x copied in, one dispatch of matmul.comp, y copied out, all in one submit.
#include "vk_backend.h"

#include "../formats.h"
#include "vk_context.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>

namespace hkvk {
namespace {

using detail::check;
using detail::Context;
using detail::context;

// The shaders' byte offsets assume these block sizes (kernels/formats.h holds the structs).
static_assert(sizeof(hk::BlockInt4) == 20 && sizeof(hk::BlockQ4_0) == 18, "block layout");
static_assert(sizeof(hk::BlockQ8_0) == 34 && sizeof(hk::BlockQ2_K) == 84, "block layout");

constexpr uint32_t kRowsPerBatchTile = 8;  // NB in matmul.comp

void barrier(Context &c, VkAccessFlags src, VkAccessFlags dst, VkPipelineStageFlags from, VkPipelineStageFlags to) {
    VkMemoryBarrier b{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    b.srcAccessMask = src;
    b.dstAccessMask = dst;
    c.vk.vkCmdPipelineBarrier(c.commands, from, to, 0, 1, &b, 0, nullptr, 0, nullptr);
}

void copy(Context &c, const detail::Buffer &from, const detail::Buffer &to, VkDeviceSize bytes) {
    VkBufferCopy region{0, 0, bytes};
    c.vk.vkCmdCopyBuffer(c.commands, from.buffer, to.buffer, 1, &region);
}

}  // namespace

const char *format_name(Format f) {
    static const char *names[kNumFormats] = {"INT4", "Q4_0", "Q8_0", "Q2_K"};
    return names[static_cast<int>(f)];
}
int format_block_size(Format f) { return f == Format::Q2_K ? hk::QK_K : hk::QK; }
int format_block_bytes(Format f) {
    static const int bytes[kNumFormats] = {sizeof(hk::BlockInt4), sizeof(hk::BlockQ4_0), sizeof(hk::BlockQ8_0),
                                           sizeof(hk::BlockQ2_K)};
    return bytes[static_cast<int>(f)];
}

double last_dispatch_seconds() {
    Context &c = context();
    std::lock_guard<std::mutex> hold(c.lock);
    return c.last_dispatch;
}

struct Weight::Buffer : detail::Buffer {};

Weight::Weight(Format format, const uint8_t *data, int64_t rows, int64_t cols)
    : format_(format), rows_(rows), cols_(cols), nbytes_(rows * (cols / format_block_size(format)) * format_block_bytes(format)) {
    Context &c = context();
    // One word of padding: the shader's unaligned loads read the word after the last byte.
    const VkDeviceSize size = (static_cast<VkDeviceSize>(nbytes_) + 3) / 4 * 4 + 4;
    if (size > c.props.limits.maxStorageBufferRange)
        throw std::runtime_error("a " + std::string(format_name(format)) + " matrix of " + std::to_string(nbytes_ >> 20) +
                                 " MiB is larger than " + c.props.deviceName + "'s largest storage buffer (" +
                                 std::to_string(c.props.limits.maxStorageBufferRange >> 20) + " MiB)");
    std::lock_guard<std::mutex> hold(c.lock);
    buffer_ = std::make_unique<Buffer>();
    c.create_buffer(*buffer_, size, VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT, false);
    detail::Buffer staging;
    try {
        c.create_buffer(staging, size, VK_BUFFER_USAGE_TRANSFER_SRC_BIT, true);
        std::memcpy(staging.mapped, data, static_cast<size_t>(nbytes_));
        std::memset(static_cast<uint8_t *>(staging.mapped) + nbytes_, 0, static_cast<size_t>(size - nbytes_));
        c.begin();
        copy(c, staging, *buffer_, size);
        c.submit_and_wait();
    } catch (...) {
        c.destroy_buffer(staging);
        c.destroy_buffer(*buffer_);
        throw;
    }
    c.destroy_buffer(staging);
}

Weight::~Weight() {
    if (!buffer_) return;
    Context &c = context();  // set up: this weight was uploaded through it
    std::lock_guard<std::mutex> hold(c.lock);
    c.destroy_buffer(*buffer_);  // no call is in flight: every matmul waits for its own
}

void Weight::matmul(const float *x, int64_t n, float *y) const {
    Context &c = context();
    const VkDeviceSize x_bytes = static_cast<VkDeviceSize>(n) * cols_ * 4, y_bytes = static_cast<VkDeviceSize>(n) * rows_ * 4;
    const uint32_t tiles = static_cast<uint32_t>((n + kRowsPerBatchTile - 1) / kRowsPerBatchTile);
    if (n <= 0) return;
    if (std::max(x_bytes, y_bytes) > c.props.limits.maxStorageBufferRange || tiles > c.props.limits.maxComputeWorkGroupCount[1])
        throw std::runtime_error("a batch of " + std::to_string(n) + " rows is too large for one Vulkan dispatch on " +
                                 c.props.deviceName + "; pass fewer rows per call");
    std::lock_guard<std::mutex> hold(c.lock);
    c.ensure(c.x_host, x_bytes, VK_BUFFER_USAGE_TRANSFER_SRC_BIT, true);
    c.ensure(c.x_device, x_bytes, VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT, false);
    c.ensure(c.y_device, y_bytes, VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT, false);
    c.ensure(c.y_host, y_bytes, VK_BUFFER_USAGE_TRANSFER_DST_BIT, true);
    std::memcpy(c.x_host.mapped, x, static_cast<size_t>(x_bytes));

    // The one descriptor set is rewritten per call: legal, since the last call's work is done.
    VkDescriptorBufferInfo infos[3] = {{buffer_->buffer, 0, VK_WHOLE_SIZE},
                                       {c.x_device.buffer, 0, x_bytes},
                                       {c.y_device.buffer, 0, y_bytes}};
    VkWriteDescriptorSet writes[3] = {};
    for (uint32_t i = 0; i < 3; ++i) {
        writes[i].sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET;
        writes[i].dstSet = c.descriptor_set;
        writes[i].dstBinding = i;
        writes[i].descriptorCount = 1;
        writes[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        writes[i].pBufferInfo = &infos[i];
    }
    c.vk.vkUpdateDescriptorSets(c.device, 3, writes, 0, nullptr);

    c.begin();
    if (c.timestamps) c.vk.vkCmdResetQueryPool(c.commands, c.timestamps, 0, 2);
    copy(c, c.x_host, c.x_device, x_bytes);
    barrier(c, VK_ACCESS_TRANSFER_WRITE_BIT, VK_ACCESS_SHADER_READ_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT,
            VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT);
    c.vk.vkCmdBindPipeline(c.commands, VK_PIPELINE_BIND_POINT_COMPUTE, c.pipelines[static_cast<int>(format_)]);
    c.vk.vkCmdBindDescriptorSets(c.commands, VK_PIPELINE_BIND_POINT_COMPUTE, c.pipeline_layout, 0, 1, &c.descriptor_set,
                                 0, nullptr);
    const uint32_t params[3] = {static_cast<uint32_t>(rows_), static_cast<uint32_t>(cols_ / 32), static_cast<uint32_t>(n)};
    c.vk.vkCmdPushConstants(c.commands, c.pipeline_layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof(params), params);
    // bottom-of-pipe stamps: written once everything before them (the x copy, then the dispatch) is done
    if (c.timestamps) c.vk.vkCmdWriteTimestamp(c.commands, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c.timestamps, 0);
    const int64_t wanted = c.row_per_workgroup ? rows_ : (rows_ + c.workgroup_size - 1) / c.workgroup_size;
    const uint32_t groups = static_cast<uint32_t>(std::min<int64_t>(wanted, c.props.limits.maxComputeWorkGroupCount[0]));
    c.vk.vkCmdDispatch(c.commands, groups, tiles, 1);  // the shader strides over rows past `groups`
    if (c.timestamps) c.vk.vkCmdWriteTimestamp(c.commands, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c.timestamps, 1);
    barrier(c, VK_ACCESS_SHADER_WRITE_BIT, VK_ACCESS_TRANSFER_READ_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
            VK_PIPELINE_STAGE_TRANSFER_BIT);
    copy(c, c.y_device, c.y_host, y_bytes);
    barrier(c, VK_ACCESS_TRANSFER_WRITE_BIT, VK_ACCESS_HOST_READ_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT,
            VK_PIPELINE_STAGE_HOST_BIT);
    c.submit_and_wait();
    std::memcpy(y, c.y_host.mapped, static_cast<size_t>(y_bytes));

    c.last_dispatch = std::numeric_limits<double>::quiet_NaN();
    if (c.timestamps) {
        uint64_t stamps[2];
        if (c.vk.vkGetQueryPoolResults(c.device, c.timestamps, 0, 2, sizeof(stamps), stamps, sizeof(uint64_t),
                                       VK_QUERY_RESULT_64_BIT) == VK_SUCCESS) {
            const uint64_t mask = c.timestamp_bits >= 64 ? ~0ull : ((1ull << c.timestamp_bits) - 1);
            c.last_dispatch = static_cast<double>((stamps[1] - stamps[0]) & mask) * c.props.limits.timestampPeriod * 1e-9;
        }
    }
}

}  // namespace hkvk
