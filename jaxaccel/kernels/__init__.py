"""jaxaccel's C++ CPU kernels (XLA FFI custom calls, compiled on first use).

  build.py           the instruction sets (`ISAS`, `host_isa`), `CpuKernel` (build, cache and
                     register one library), `KernelFamily` (a source's library per ISA); batch
                     sharding and vmap of custom calls
  common.h           C++ shared by the kernels (the ISA macros, XLA's thread pool, Winograd
                     tile origins)
  winograd.{py,cc}   the Winograd F(2x2, 3x3) and F(4x4, 3x3) transforms (`G`, `G4`, ...) and
                     the float32 F(4x4, 3x3) conv kernels (conv_impl "cpu_kernel")
  int8.{py,cc}       int8 conv / matmul kernel (int8 inference's "cpu_kernel" lowering)

Importing it builds nothing; a kernel is compiled when first checked or called. The package
imports nothing else of jaxaccel: models, compress and bench import it, never the reverse.
"""
