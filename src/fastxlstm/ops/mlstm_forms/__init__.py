"""mLSTM forms: reference (the definition), parallel, chunkwise, recurrent, and Triton kernels on CUDA."""
