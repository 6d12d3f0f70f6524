// Runs every C++ kernel test group (one file per op family) and returns 1 if
// any check failed. The op library is linked --no-as-needed (CMakeLists.txt),
// so its TORCH_LIBRARY registrations are present although nothing here
// references a symbol of it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdio>

#include "check.h"

void run_masked_op_tests();
void run_sam_step_tests();
void run_mask_scoring_tests();
void run_sparse_op_tests();

int main() {
  using namespace sparsesam_test;
  at::manual_seed(0);
  run_masked_op_tests();
  run_sam_step_tests();
  run_mask_scoring_tests();
  run_sparse_op_tests();
  std::printf("%d checks, %d failed (ATen threads: %d)\n", g_checks, g_failures, at::get_num_threads());
  return g_failures == 0 ? 0 : 1;
}
