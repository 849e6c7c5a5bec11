// Vulkan device setup for the quantized matmul (see vk_context.h).
//
// The loader is opened with dlopen / LoadLibrary and every entry point fetched through
// vkGetInstanceProcAddr (VK_NO_PROTOTYPES): the module needs the Vulkan headers to build but
// not the loader to import, so "no Vulkan here" is a message, not an ImportError.
// Only Vulkan 1.0 features are used (storage buffers, push constants, specialization constants,
// timestamps when the queue has them), so any 1.0+ device runs it: discrete GPUs, integrated
// ones, lavapipe.
#include "vk_context.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#else
#include <dlfcn.h>
#endif

namespace hkvk::detail {
namespace {

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

}  // namespace

void check(VkResult r, const char *what) {
    if (r != VK_SUCCESS) throw std::runtime_error(std::string("Vulkan: ") + what + " failed (" + result_name(r) + ")");
}

namespace {

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

}  // namespace

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

namespace {

// Never destroyed: tearing a device down from a static destructor races the loader's and the
// driver's own exit handlers; the process exit frees it all.
Context *g_context = nullptr;
std::string g_status;
std::once_flag g_once;

}  // namespace

Context &context() {
    std::call_once(g_once, [] {
        auto *c = new Context();
        g_status = c->init();
        g_context = c;  // kept even when init failed: device_info() and Weight refuse through g_status
    });
    if (!g_status.empty()) throw std::runtime_error(g_status);
    return *g_context;
}

}  // namespace hkvk::detail

namespace hkvk {

using detail::Context;
using detail::context;

const std::string &init_status() {
    try {
        context();
    } catch (const std::exception &) {
    }
    return detail::g_status;
}

DeviceInfo device_info() {
    Context &c = context();
    DeviceInfo info;
    info.name = c.props.deviceName;
    info.type = detail::type_name(c.props.deviceType);
    uint32_t v = c.props.apiVersion;
    info.api_version = std::to_string(VK_API_VERSION_MAJOR(v)) + "." + std::to_string(VK_API_VERSION_MINOR(v)) + "." +
                       std::to_string(VK_API_VERSION_PATCH(v));
    info.driver = std::to_string(c.props.driverVersion);
    info.max_storage_buffer_range = c.props.limits.maxStorageBufferRange;
    info.timestamps = c.timestamps != VK_NULL_HANDLE;
    info.rows = c.row_per_workgroup ? "workgroup" : "invocation";
    return info;
}

}  // namespace hkvk
