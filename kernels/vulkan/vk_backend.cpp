// Vulkan runtime of the quantized matmul (see vk_backend.h).
//
// The loader is opened with dlopen / LoadLibrary and every entry point fetched through
// vkGetInstanceProcAddr (VK_NO_PROTOTYPES): the module needs the Vulkan headers to build but
// not the loader to import, so "no Vulkan here" is a message, not an ImportError.
// Only Vulkan 1.0 features are used (storage buffers, push constants, timestamps when the
// queue has them), so any 1.0+ device runs it: discrete GPUs, integrated ones, lavapipe.
#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include "vk_backend.h"

#include "../formats.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <vector>

#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#else
#include <dlfcn.h>
#endif

namespace hkvk {
namespace {

// The shaders' byte offsets assume these block sizes (kernels/formats.h holds the structs).
static_assert(sizeof(hk::BlockInt4) == 20 && sizeof(hk::BlockQ4_0) == 18, "block layout");
static_assert(sizeof(hk::BlockQ8_0) == 34 && sizeof(hk::BlockQ2_K) == 84, "block layout");

// SPIR-V of kernels/vulkan/matmul.comp, one per format, compiled by glslc at build time (-mfmt=c).
const uint32_t kSpirvInt4[] =
#include "matmul_int4.spv.inc"
    ;
const uint32_t kSpirvQ4_0[] =
#include "matmul_q4_0.spv.inc"
    ;
const uint32_t kSpirvQ8_0[] =
#include "matmul_q8_0.spv.inc"
    ;
const uint32_t kSpirvQ2_K[] =
#include "matmul_q2_k.spv.inc"
    ;

struct Spirv {
    const uint32_t *code;
    size_t bytes;
};
const Spirv kShaders[kNumFormats] = {{kSpirvInt4, sizeof(kSpirvInt4)}, {kSpirvQ4_0, sizeof(kSpirvQ4_0)},
                                     {kSpirvQ8_0, sizeof(kSpirvQ8_0)}, {kSpirvQ2_K, sizeof(kSpirvQ2_K)}};

constexpr uint32_t kRowsPerBatchTile = 8;  // NB in matmul.comp

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

const char *result_name(VkResult r) {
    switch (r) {
        case VK_ERROR_OUT_OF_HOST_MEMORY: return "VK_ERROR_OUT_OF_HOST_MEMORY";
        case VK_ERROR_OUT_OF_DEVICE_MEMORY: return "VK_ERROR_OUT_OF_DEVICE_MEMORY";
        case VK_ERROR_INITIALIZATION_FAILED: return "VK_ERROR_INITIALIZATION_FAILED";
        case VK_ERROR_DEVICE_LOST: return "VK_ERROR_DEVICE_LOST";
        case VK_ERROR_INCOMPATIBLE_DRIVER: return "VK_ERROR_INCOMPATIBLE_DRIVER";
        case VK_ERROR_LAYER_NOT_PRESENT: return "VK_ERROR_LAYER_NOT_PRESENT";
        case VK_ERROR_EXTENSION_NOT_PRESENT: return "VK_ERROR_EXTENSION_NOT_PRESENT";
        case VK_ERROR_FEATURE_NOT_PRESENT: return "VK_ERROR_FEATURE_NOT_PRESENT";
        case VK_ERROR_TOO_MANY_OBJECTS: return "VK_ERROR_TOO_MANY_OBJECTS";
        case VK_TIMEOUT: return "VK_TIMEOUT";
        default: return "VkResult error";
    }
}

void check(VkResult r, const char *what) {
    if (r != VK_SUCCESS) throw std::runtime_error(std::string("Vulkan: ") + what + " failed (" + result_name(r) + ")");
}

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

void *open_loader() {
#if defined(_WIN32)
    return reinterpret_cast<void *>(LoadLibraryA("vulkan-1.dll"));
#elif defined(__APPLE__)
    for (const char *name : {"libvulkan.1.dylib", "libvulkan.dylib", "libMoltenVK.dylib"})
        if (void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL)) return lib;
    return nullptr;
#else
    for (const char *name : {"libvulkan.so.1", "libvulkan.so"})
        if (void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL)) return lib;
    return nullptr;
#endif
}

void *loader_symbol(void *lib, const char *name) {
#ifdef _WIN32
    return reinterpret_cast<void *>(GetProcAddress(reinterpret_cast<HMODULE>(lib), name));
#else
    return dlsym(lib, name);
#endif
}

const char *kLoaderName =
#if defined(_WIN32)
    "vulkan-1.dll";
#elif defined(__APPLE__)
    "libvulkan.1.dylib";
#else
    "libvulkan.so.1";
#endif

int type_rank(VkPhysicalDeviceType t) {
    switch (t) {
        case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 4;
        case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 3;
        case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
        case VK_PHYSICAL_DEVICE_TYPE_CPU: return 1;
        default: return 0;
    }
}

const char *type_name(VkPhysicalDeviceType t) {
    switch (t) {
        case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete GPU";
        case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated GPU";
        case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual GPU";
        case VK_PHYSICAL_DEVICE_TYPE_CPU: return "CPU";
        default: return "other";
    }
}

int compute_family(const Api &vk, VkPhysicalDevice dev) {
    uint32_t count = 0;
    vk.vkGetPhysicalDeviceQueueFamilyProperties(dev, &count, nullptr);
    std::vector<VkQueueFamilyProperties> families(count);
    vk.vkGetPhysicalDeviceQueueFamilyProperties(dev, &count, families.data());
    int any = -1;
    for (uint32_t i = 0; i < count; ++i) {
        if (!(families[i].queueFlags & VK_QUEUE_COMPUTE_BIT)) continue;
        if (!(families[i].queueFlags & VK_QUEUE_GRAPHICS_BIT)) return static_cast<int>(i);  // a compute-only queue
        if (any < 0) any = static_cast<int>(i);
    }
    return any;
}

const char *kNoDriverHint =
    "install your GPU's Vulkan driver (no GPU: the CPU driver lavapipe, `apt-get install mesa-vulkan-drivers`) "
    "and check `vulkaninfo --summary`";

std::string Context::init() {
    void *lib = open_loader();
    if (!lib)
        return std::string("the Vulkan loader (") + kLoaderName +
               ") is not installed; install it (Debian/Ubuntu: apt-get install libvulkan1 mesa-vulkan-drivers; "
               "Windows/macOS: your GPU driver or the LunarG Vulkan SDK)";
    vk.vkGetInstanceProcAddr = reinterpret_cast<PFN_vkGetInstanceProcAddr>(loader_symbol(lib, "vkGetInstanceProcAddr"));
    if (!vk.vkGetInstanceProcAddr) return std::string(kLoaderName) + " has no vkGetInstanceProcAddr; reinstall the Vulkan loader";
    vk.vkCreateInstance =
        reinterpret_cast<PFN_vkCreateInstance>(vk.vkGetInstanceProcAddr(VK_NULL_HANDLE, "vkCreateInstance"));
    vk.vkEnumerateInstanceVersion = reinterpret_cast<PFN_vkEnumerateInstanceVersion>(
        vk.vkGetInstanceProcAddr(VK_NULL_HANDLE, "vkEnumerateInstanceVersion"));
    uint32_t loader_version = VK_API_VERSION_1_0;
    if (vk.vkEnumerateInstanceVersion) vk.vkEnumerateInstanceVersion(&loader_version);

    VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
    app.pApplicationName = "hierarchos";
    app.pEngineName = "hierarchos_vulkan";
    // A 1.0 loader rejects any higher version; newer ones take up to what they know.
    app.apiVersion = std::min<uint32_t>(loader_version, VK_API_VERSION_1_2);
    VkInstanceCreateInfo instance_info{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
    instance_info.pApplicationInfo = &app;
    VkResult r = vk.vkCreateInstance(&instance_info, nullptr, &instance);
    if (r == VK_ERROR_INCOMPATIBLE_DRIVER) return std::string("no Vulkan driver found; ") + kNoDriverHint;
    if (r != VK_SUCCESS) return std::string("vkCreateInstance failed (") + result_name(r) + "); " + kNoDriverHint;
#define HKVK_LOAD_INSTANCE(name)                                                                 \
    vk.name = reinterpret_cast<PFN_##name>(vk.vkGetInstanceProcAddr(instance, #name));           \
    if (!vk.name) return std::string("the Vulkan loader lacks " #name "; update it");
    HKVK_INSTANCE_FUNCS(HKVK_LOAD_INSTANCE)
#undef HKVK_LOAD_INSTANCE

    uint32_t count = 0;
    vk.vkEnumeratePhysicalDevices(instance, &count, nullptr);
    std::vector<VkPhysicalDevice> devices(count);
    if (count) vk.vkEnumeratePhysicalDevices(instance, &count, devices.data());
    if (devices.empty()) return std::string("no Vulkan device found; ") + kNoDriverHint;
    int chosen = -1, best = -1;
    if (const char *forced = std::getenv("HIERARCHOS_VULKAN_DEVICE"); forced && *forced) {
        char *end = nullptr;
        long index = std::strtol(forced, &end, 10);
        if (*end || index < 0 || index >= static_cast<long>(devices.size()))
            return "HIERARCHOS_VULKAN_DEVICE=" + std::string(forced) + ": expected a device index 0.." +
                   std::to_string(devices.size() - 1) + " (see `vulkaninfo --summary`)";
        if (compute_family(vk, devices[index]) < 0)
            return "HIERARCHOS_VULKAN_DEVICE=" + std::string(forced) + ": that device has no compute queue";
        chosen = static_cast<int>(index);
    } else {
        for (size_t i = 0; i < devices.size(); ++i) {  // the first device of the best type
            VkPhysicalDeviceProperties p;
            vk.vkGetPhysicalDeviceProperties(devices[i], &p);
            if (compute_family(vk, devices[i]) >= 0 && type_rank(p.deviceType) > best) {
                best = type_rank(p.deviceType);
                chosen = static_cast<int>(i);
            }
        }
        if (chosen < 0) return "no Vulkan device with a compute queue found; " + std::string(kNoDriverHint);
    }
    physical = devices[chosen];
    vk.vkGetPhysicalDeviceProperties(physical, &props);
    vk.vkGetPhysicalDeviceMemoryProperties(physical, &memory_props);
    queue_family = static_cast<uint32_t>(compute_family(vk, physical));
    {
        uint32_t n = 0;
        vk.vkGetPhysicalDeviceQueueFamilyProperties(physical, &n, nullptr);
        std::vector<VkQueueFamilyProperties> families(n);
        vk.vkGetPhysicalDeviceQueueFamilyProperties(physical, &n, families.data());
        timestamp_bits = families[queue_family].timestampValidBits;  // 0: this queue has no timestamps
    }

    float priority = 1.0f;
    VkDeviceQueueCreateInfo queue_info{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
    queue_info.queueFamilyIndex = queue_family;
    queue_info.queueCount = 1;
    queue_info.pQueuePriorities = &priority;
    VkDeviceCreateInfo device_info{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
    device_info.queueCreateInfoCount = 1;
    device_info.pQueueCreateInfos = &queue_info;
    r = vk.vkCreateDevice(physical, &device_info, nullptr, &device);
    if (r != VK_SUCCESS)
        return std::string("vkCreateDevice failed on ") + props.deviceName + " (" + result_name(r) + "); " + kNoDriverHint;
#define HKVK_LOAD_DEVICE(name)                                                          \
    vk.name = reinterpret_cast<PFN_##name>(vk.vkGetDeviceProcAddr(device, #name));      \
    if (!vk.name) return std::string("the Vulkan driver lacks " #name "; update it");
    HKVK_DEVICE_FUNCS(HKVK_LOAD_DEVICE)
#undef HKVK_LOAD_DEVICE
    vk.vkGetDeviceQueue(device, queue_family, 0, &queue);
    row_per_workgroup = props.deviceType != VK_PHYSICAL_DEVICE_TYPE_CPU;
    if (const char *forced = std::getenv("HIERARCHOS_VULKAN_ROWS"); forced && *forced) {
        if (std::strcmp(forced, "workgroup") && std::strcmp(forced, "invocation"))
            return "HIERARCHOS_VULKAN_ROWS=" + std::string(forced) + ": expected workgroup or invocation";
        row_per_workgroup = !std::strcmp(forced, "workgroup");
    }
    workgroup_size = row_per_workgroup ? 32 : 8;  // a warp per row; 8 lanes: llvmpipe's 256-bit SIMD

    try {
        VkDescriptorSetLayoutBinding bindings[3] = {};
        for (uint32_t i = 0; i < 3; ++i) {
            bindings[i].binding = i;  // 0 weights, 1 activations, 2 outputs
            bindings[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
            bindings[i].descriptorCount = 1;
            bindings[i].stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
        }
        VkDescriptorSetLayoutCreateInfo set_info{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO};
        set_info.bindingCount = 3;
        set_info.pBindings = bindings;
        check(vk.vkCreateDescriptorSetLayout(device, &set_info, nullptr, &set_layout), "vkCreateDescriptorSetLayout");
        VkPushConstantRange push{VK_SHADER_STAGE_COMPUTE_BIT, 0, 3 * sizeof(uint32_t)};
        VkPipelineLayoutCreateInfo layout_info{VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO};
        layout_info.setLayoutCount = 1;
        layout_info.pSetLayouts = &set_layout;
        layout_info.pushConstantRangeCount = 1;
        layout_info.pPushConstantRanges = &push;
        check(vk.vkCreatePipelineLayout(device, &layout_info, nullptr, &pipeline_layout), "vkCreatePipelineLayout");
        const uint32_t spec_values[2] = {workgroup_size, row_per_workgroup ? VK_TRUE : VK_FALSE};
        const VkSpecializationMapEntry spec_entries[2] = {{0, 0, 4}, {1, 4, 4}};
        VkSpecializationInfo spec{2, spec_entries, sizeof(spec_values), spec_values};
        for (int f = 0; f < kNumFormats; ++f) {
            VkShaderModuleCreateInfo module_info{VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO};
            module_info.codeSize = kShaders[f].bytes;
            module_info.pCode = kShaders[f].code;
            VkShaderModule module;
            check(vk.vkCreateShaderModule(device, &module_info, nullptr, &module), "vkCreateShaderModule");
            VkComputePipelineCreateInfo pipeline_info{VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
            pipeline_info.stage = {VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO};
            pipeline_info.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
            pipeline_info.stage.module = module;
            pipeline_info.stage.pName = "main";
            pipeline_info.stage.pSpecializationInfo = &spec;
            pipeline_info.layout = pipeline_layout;
            VkResult made = vk.vkCreateComputePipelines(device, VK_NULL_HANDLE, 1, &pipeline_info, nullptr, &pipelines[f]);
            vk.vkDestroyShaderModule(device, module, nullptr);
            check(made, "vkCreateComputePipelines");
        }
        VkDescriptorPoolSize pool_size{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 3};
        VkDescriptorPoolCreateInfo pool_info{VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO};
        pool_info.maxSets = 1;
        pool_info.poolSizeCount = 1;
        pool_info.pPoolSizes = &pool_size;
        VkDescriptorPool pool;
        check(vk.vkCreateDescriptorPool(device, &pool_info, nullptr, &pool), "vkCreateDescriptorPool");
        VkDescriptorSetAllocateInfo alloc{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO};
        alloc.descriptorPool = pool;
        alloc.descriptorSetCount = 1;
        alloc.pSetLayouts = &set_layout;
        check(vk.vkAllocateDescriptorSets(device, &alloc, &descriptor_set), "vkAllocateDescriptorSets");
        VkCommandPoolCreateInfo command_pool_info{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
        command_pool_info.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
        command_pool_info.queueFamilyIndex = queue_family;
        VkCommandPool command_pool;
        check(vk.vkCreateCommandPool(device, &command_pool_info, nullptr, &command_pool), "vkCreateCommandPool");
        VkCommandBufferAllocateInfo command_info{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
        command_info.commandPool = command_pool;
        command_info.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
        command_info.commandBufferCount = 1;
        check(vk.vkAllocateCommandBuffers(device, &command_info, &commands), "vkAllocateCommandBuffers");
        VkFenceCreateInfo fence_info{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
        check(vk.vkCreateFence(device, &fence_info, nullptr, &fence), "vkCreateFence");
        if (timestamp_bits) {
            VkQueryPoolCreateInfo query_info{VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO};
            query_info.queryType = VK_QUERY_TYPE_TIMESTAMP;
            query_info.queryCount = 2;
            check(vk.vkCreateQueryPool(device, &query_info, nullptr, &timestamps), "vkCreateQueryPool");
        }
    } catch (const std::exception &error) {
        return std::string(error.what()) + " on " + props.deviceName;
    }
    return "";
}

uint32_t Context::memory_type(uint32_t allowed, VkMemoryPropertyFlags want, VkMemoryPropertyFlags fallback) const {
    for (VkMemoryPropertyFlags flags : {want, fallback})
        for (uint32_t i = 0; i < memory_props.memoryTypeCount; ++i)
            if ((allowed & (1u << i)) && (memory_props.memoryTypes[i].propertyFlags & flags) == flags) return i;
    throw std::runtime_error("Vulkan: no suitable memory type on this device");
}

void Context::create_buffer(Buffer &b, VkDeviceSize size, VkBufferUsageFlags usage, bool host_visible) {
    VkBufferCreateInfo info{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    info.size = size;
    info.usage = usage;
    info.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    check(vk.vkCreateBuffer(device, &info, nullptr, &b.buffer), "vkCreateBuffer");
    VkMemoryRequirements need;
    vk.vkGetBufferMemoryRequirements(device, b.buffer, &need);
    const VkMemoryPropertyFlags coherent = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    VkMemoryAllocateInfo alloc{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
    alloc.allocationSize = need.size;
    // host side: cached too when there is such a type (y is read back by the CPU)
    alloc.memoryTypeIndex = host_visible
                                ? memory_type(need.memoryTypeBits, coherent | VK_MEMORY_PROPERTY_HOST_CACHED_BIT, coherent)
                                : memory_type(need.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0);
    VkResult r = vk.vkAllocateMemory(device, &alloc, nullptr, &b.memory);
    if (r != VK_SUCCESS) {
        vk.vkDestroyBuffer(device, b.buffer, nullptr);
        b = Buffer{};
        throw std::runtime_error("Vulkan: cannot allocate " + std::to_string(size >> 20) + " MiB on " +
                                 props.deviceName + " (" + result_name(r) + ")");
    }
    check(vk.vkBindBufferMemory(device, b.buffer, b.memory, 0), "vkBindBufferMemory");
    if (host_visible) check(vk.vkMapMemory(device, b.memory, 0, VK_WHOLE_SIZE, 0, &b.mapped), "vkMapMemory");
    b.size = size;
}

void Context::destroy_buffer(Buffer &b) {
    if (b.buffer) vk.vkDestroyBuffer(device, b.buffer, nullptr);
    if (b.memory) vk.vkFreeMemory(device, b.memory, nullptr);  // unmaps too
    b = Buffer{};
}

void Context::ensure(Buffer &b, VkDeviceSize size, VkBufferUsageFlags usage, bool host_visible) {
    if (b.size >= size) return;
    destroy_buffer(b);
    create_buffer(b, std::max<VkDeviceSize>(size, 2 * b.size), usage, host_visible);
}

void Context::begin() {
    check(vk.vkResetCommandBuffer(commands, 0), "vkResetCommandBuffer");
    VkCommandBufferBeginInfo info{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    info.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    check(vk.vkBeginCommandBuffer(commands, &info), "vkBeginCommandBuffer");
}

void Context::submit_and_wait() {
    check(vk.vkEndCommandBuffer(commands), "vkEndCommandBuffer");
    VkSubmitInfo submit{VK_STRUCTURE_TYPE_SUBMIT_INFO};
    submit.commandBufferCount = 1;
    submit.pCommandBuffers = &commands;
    check(vk.vkQueueSubmit(queue, 1, &submit, fence), "vkQueueSubmit");
    VkResult r = vk.vkWaitForFences(device, 1, &fence, VK_TRUE, UINT64_MAX);
    vk.vkResetFences(device, 1, &fence);
    check(r, "vkWaitForFences");
}

void barrier(Context &c, VkAccessFlags src, VkAccessFlags dst, VkPipelineStageFlags from, VkPipelineStageFlags to) {
    VkMemoryBarrier b{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    b.srcAccessMask = src;
    b.dstAccessMask = dst;
    c.vk.vkCmdPipelineBarrier(c.commands, from, to, 0, 1, &b, 0, nullptr, 0, nullptr);
}

void copy(Context &c, const Buffer &from, const Buffer &to, VkDeviceSize bytes) {
    VkBufferCopy region{0, 0, bytes};
    c.vk.vkCmdCopyBuffer(c.commands, from.buffer, to.buffer, 1, &region);
}

// Never destroyed: tearing a device down from a static destructor races the loader's and the
// driver's own exit handlers; the process exit frees it all.
Context *g_context = nullptr;
std::string g_status;
std::once_flag g_once;

Context &context() {
    std::call_once(g_once, [] {
        auto *c = new Context();
        g_status = c->init();
        g_context = c;  // kept even when init failed: device_info() and Weight refuse through g_status
    });
    if (!g_status.empty()) throw std::runtime_error(g_status);
    return *g_context;
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

const std::string &init_status() {
    try {
        context();
    } catch (const std::exception &) {
    }
    return g_status;
}

DeviceInfo device_info() {
    Context &c = context();
    DeviceInfo info;
    info.name = c.props.deviceName;
    info.type = type_name(c.props.deviceType);
    uint32_t v = c.props.apiVersion;
    info.api_version = std::to_string(VK_API_VERSION_MAJOR(v)) + "." + std::to_string(VK_API_VERSION_MINOR(v)) + "." +
                       std::to_string(VK_API_VERSION_PATCH(v));
    info.driver = std::to_string(c.props.driverVersion);
    info.max_storage_buffer_range = c.props.limits.maxStorageBufferRange;
    info.timestamps = c.timestamps != VK_NULL_HANDLE;
    info.rows = c.row_per_workgroup ? "workgroup" : "invocation";
    return info;
}

double last_dispatch_seconds() {
    Context &c = context();
    std::lock_guard<std::mutex> hold(c.lock);
    return c.last_dispatch;
}

struct Weight::Buffer : hkvk::Buffer {};

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
    hkvk::Buffer staging;
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
    Context &c = *g_context;
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
