// The Python module `sparsesam._C`: importing it loads this library, which
// runs the static TORCH_LIBRARY registrations in ops.cpp and the kernel
// files. Its one function, schemas(), hands Python the schema list of
// common/schemas.h, so sparsesam/ops binds a CUDA backend for every op from
// the same list the C++ side registers. Kept apart from ops.cpp so the
// CMake/libtorch build (no Python) compiles the same op sources.
#include <Python.h>

#include <cstddef>
#include <iterator>

#include "common/schemas.h"

namespace {

PyObject* schemas(PyObject* /*self*/, PyObject* /*args*/) {
  const Py_ssize_t n = static_cast<Py_ssize_t>(std::size(sparsesam::kSchemas));
  PyObject* out = PyTuple_New(n);
  if (out == nullptr) {
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* text = PyUnicode_FromString(sparsesam::kSchemas[i]);
    if (text == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SetItem(out, i, text);  // steals the reference
  }
  return out;
}

PyMethodDef methods[] = {
    {"schemas", schemas, METH_NOARGS,
     "schemas() -> tuple[str, ...]: every op schema of csrc/common/schemas.h, in registration order."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sparsesam compiled ops (registered with torch.library)", -1, methods,
      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
