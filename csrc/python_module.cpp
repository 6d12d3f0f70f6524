// An importable, empty Python module: `import sparsesam._C` loads this
// library, which runs the static TORCH_LIBRARY registrations in ops.cpp and
// the kernel files. Kept apart from ops.cpp so the CMake/libtorch build
// (no Python) compiles the same op sources.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sparsesam compiled ops (registered with torch.library)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
