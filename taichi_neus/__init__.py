"""taichi_neus: NeuS-style neural implicit surfaces in Taichi, on CUDA, Vulkan, Metal or the CPU."""

__version__ = "0.1.0"
