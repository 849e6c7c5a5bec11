// pybind11 module `hierarchos_vulkan`: the Vulkan matmul for Python (hierarchos/quant/vulkan.py
// wraps it). numpy in, numpy out; argument checks with the messages of the numpy reference
// (hierarchos/quant/formats.py); the GIL released while the device works.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "vk_backend.h"

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

hkvk::Format parse_format(const std::string &name) {
    for (int i = 0; i < hkvk::kNumFormats; ++i)
        if (name == hkvk::format_name(static_cast<hkvk::Format>(i))) return static_cast<hkvk::Format>(i);
    throw py::value_error("unknown qtype '" + name + "'; known: INT4, Q4_0, Q8_0, Q2_K");
}

std::shared_ptr<hkvk::Weight> upload(const ByteArray &data, const std::string &qtype, int64_t cols) {
    const hkvk::Format f = parse_format(qtype);
    const int need = hkvk::format_block_size(f);
    if (data.ndim() != 2) throw py::value_error("quantized data must be a 2-D uint8 array");
    const int64_t rows = data.shape(0);
    if (cols <= 0 || cols % need)
        throw py::value_error(qtype + " needs the number of columns to be a positive multiple of " + std::to_string(need) +
                              "; got a (" + std::to_string(rows) + ", " + std::to_string(cols) + ") matrix");
    const int64_t row_bytes = cols / need * hkvk::format_block_bytes(f);
    if (data.shape(1) != row_bytes)
        throw py::value_error(qtype + " rows of " + std::to_string(cols) + " columns take " + std::to_string(row_bytes) +
                              " bytes, got " + std::to_string(data.shape(1)));
    if (rows <= 0) throw py::value_error("a quantized matrix needs at least one row");
    const uint8_t *bytes = data.data();
    py::gil_scoped_release release;
    return std::make_shared<hkvk::Weight>(f, bytes, rows, cols);
}

py::array_t<float> matmul(const hkvk::Weight &w, const FloatArray &x) {
    if (x.ndim() != 2 || x.shape(1) != w.cols())
        throw py::value_error("x must be (N, " + std::to_string(w.cols()) + "), got a " + std::to_string(x.ndim()) +
                              "-D array" + (x.ndim() == 2 ? " with " + std::to_string(x.shape(1)) + " columns" : ""));
    const int64_t n = x.shape(0);
    py::array_t<float> y({n, w.rows()});
    const float *src = x.data();
    float *dst = y.mutable_data();
    {
        py::gil_scoped_release release;
        w.matmul(src, n, dst);
    }
    return y;
}

}  // namespace

PYBIND11_MODULE(hierarchos_vulkan, m) {
    m.doc() = "Vulkan compute backend of the quantized matmul (INT4, Q4_0, Q8_0, Q2_K), float32 activations";
    m.def("init_status", &hkvk::init_status,
          "'' when a Vulkan device is ready, else why not (one line); the first call opens the device");
    m.def("device_info", [] {
        const hkvk::DeviceInfo info = hkvk::device_info();
        py::dict d;
        d["name"] = info.name;
        d["type"] = info.type;
        d["api_version"] = info.api_version;
        d["driver_version"] = info.driver;
        d["max_storage_buffer_range"] = info.max_storage_buffer_range;
        d["timestamps"] = info.timestamps;
        d["rows_per"] = info.rows;
        return d;
    });
    py::class_<hkvk::Weight, std::shared_ptr<hkvk::Weight>>(m, "Weight", "a quantized matrix resident on the device")
        .def_property_readonly("qtype", [](const hkvk::Weight &w) { return std::string(hkvk::format_name(w.format())); })
        .def_property_readonly("rows", &hkvk::Weight::rows)
        .def_property_readonly("cols", &hkvk::Weight::cols)
        .def_property_readonly("nbytes", &hkvk::Weight::nbytes)
        .def("__repr__", [](const hkvk::Weight &w) {
            return "<hierarchos_vulkan.Weight " + std::string(hkvk::format_name(w.format())) + " " +
                   std::to_string(w.rows()) + "x" + std::to_string(w.cols()) + ">";
        });
    m.def("upload", &upload, py::arg("data"), py::arg("qtype"), py::arg("cols"),
          "copy quantized blocks (rows, row_bytes) uint8 to the device once -> Weight");
    m.def("matmul", &matmul, py::arg("weight"), py::arg("x"), "y (N, rows) = x (N, cols) @ W.T on the device");
    m.def("last_dispatch_seconds", &hkvk::last_dispatch_seconds,
          "device time of the last matmul's dispatch (timestamp queries; NaN without them)");
}
