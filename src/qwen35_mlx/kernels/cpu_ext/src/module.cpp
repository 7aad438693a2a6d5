// qwen35_mlx's optional CPU extension: one module, one primitive a source file.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void register_gated_delta(nb::module_& m);
void register_matmul_rows(nb::module_& m);
void register_attention(nb::module_& m);
void register_half_ops(nb::module_& m);
void register_mtp_head(nb::module_& m);

NB_MODULE(_qwen35_mlx_cpu, m) {
  m.doc() =
      "qwen35_mlx: native CPU primitives (gated delta, few-rows matmul, decode attention, "
      "float16 chains, the MTP head's step)";
  register_gated_delta(m);
  register_matmul_rows(m);
  register_attention(m);
  register_half_ops(m);
  register_mtp_head(m);
}
