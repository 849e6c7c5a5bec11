// The Vulkan device context shared by the matmul (vk_backend.cpp) and set up in vk_context.cpp:
// the loader's entry points, the chosen device and queue, one compute pipeline per format, one
// command buffer, fence and descriptor set, and the staging buffers of a call.
#pragma once

#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <string>

#include "vk_backend.h"

namespace hkvk::detail {

#define HKVK_INSTANCE_FUNCS(X)                                                                               \
    X(vkDestroyInstance) X(vkEnumeratePhysicalDevices) X(vkGetPhysicalDeviceProperties)                    \
    X(vkGetPhysicalDeviceQueueFamilyProperties) X(vkGetPhysicalDeviceMemoryProperties) X(vkCreateDevice)   \
    X(vkGetDeviceProcAddr)
#define HKVK_DEVICE_FUNCS(X)                                                                                 \
    X(vkDestroyDevice) X(vkGetDeviceQueue) X(vkCreateBuffer) X(vkDestroyBuffer)                            \
    X(vkGetBufferMemoryRequirements) X(vkAllocateMemory) X(vkFreeMemory) X(vkBindBufferMemory)             \
    X(vkMapMemory) X(vkCreateShaderModule) X(vkDestroyShaderModule) X(vkCreateDescriptorSetLayout)         \
    X(vkCreatePipelineLayout) X(vkCreateComputePipelines) X(vkCreateDescriptorPool)                        \
    X(vkAllocateDescriptorSets) X(vkUpdateDescriptorSets) X(vkCreateCommandPool)                           \
    X(vkAllocateCommandBuffers) X(vkResetCommandBuffer) X(vkBeginCommandBuffer) X(vkEndCommandBuffer)      \
    X(vkCmdBindPipeline) X(vkCmdBindDescriptorSets) X(vkCmdPushConstants) X(vkCmdDispatch)                 \
    X(vkCmdCopyBuffer) X(vkCmdPipelineBarrier) X(vkCmdWriteTimestamp) X(vkCmdResetQueryPool)               \
    X(vkCreateQueryPool) X(vkGetQueryPoolResults) X(vkQueueSubmit) X(vkCreateFence) X(vkWaitForFences)     \
    X(vkResetFences)

struct Api {
    PFN_vkGetInstanceProcAddr vkGetInstanceProcAddr = nullptr;
    PFN_vkCreateInstance vkCreateInstance = nullptr;
    PFN_vkEnumerateInstanceVersion vkEnumerateInstanceVersion = nullptr;  // 1.1+ loaders only
#define HKVK_DECLARE(name) PFN_##name name = nullptr;
    HKVK_INSTANCE_FUNCS(HKVK_DECLARE)
    HKVK_DEVICE_FUNCS(HKVK_DECLARE)
#undef HKVK_DECLARE
};

void check(VkResult r, const char *what);  // throws std::runtime_error naming the call and result

struct Buffer {
    VkBuffer buffer = VK_NULL_HANDLE;
    VkDeviceMemory memory = VK_NULL_HANDLE;
    VkDeviceSize size = 0;
    void *mapped = nullptr;  // host-visible buffers stay mapped for their whole life
};

class Context {
public:
    Api vk;
    VkInstance instance = VK_NULL_HANDLE;
    VkPhysicalDevice physical = VK_NULL_HANDLE;
    VkPhysicalDeviceProperties props{};
    VkPhysicalDeviceMemoryProperties memory_props{};
    VkDevice device = VK_NULL_HANDLE;
    VkQueue queue = VK_NULL_HANDLE;
    uint32_t queue_family = 0;
    VkDescriptorSetLayout set_layout = VK_NULL_HANDLE;
    VkPipelineLayout pipeline_layout = VK_NULL_HANDLE;
    VkPipeline pipelines[kNumFormats] = {};
    VkDescriptorSet descriptor_set = VK_NULL_HANDLE;
    VkCommandBuffer commands = VK_NULL_HANDLE;
    VkFence fence = VK_NULL_HANDLE;
    VkQueryPool timestamps = VK_NULL_HANDLE;
    uint32_t timestamp_bits = 0;
    // matmul.comp's work split (its specialization constants): a workgroup per row on GPUs, an
    // invocation per row on CPU drivers; HIERARCHOS_VULKAN_ROWS=workgroup|invocation forces one.
    bool row_per_workgroup = true;
    uint32_t workgroup_size = 32;
    // Per-call staging: x goes host -> device before the dispatch, y device -> host after it, so
    // the shader reads device-local memory on a discrete GPU (on lavapipe the copies are memcpys).
    Buffer x_host, x_device, y_device, y_host;
    std::mutex lock;  // one command buffer and one set of staging buffers: one call at a time
    double last_dispatch = std::numeric_limits<double>::quiet_NaN();

    std::string init();
    void create_buffer(Buffer &b, VkDeviceSize size, VkBufferUsageFlags usage, bool host_visible);
    void destroy_buffer(Buffer &b);
    void ensure(Buffer &b, VkDeviceSize size, VkBufferUsageFlags usage, bool host_visible);
    void begin();
    void submit_and_wait();

private:
    uint32_t memory_type(uint32_t allowed, VkMemoryPropertyFlags want, VkMemoryPropertyFlags fallback) const;
};

// The process-wide context, set up on first use; throws std::runtime_error(init_status()) when
// there is no usable device.
Context &context();

}  // namespace hkvk::detail
