"""Triton kernels for the mLSTM (CUDA). Work in progress: see issue 5."""


def mlstm_triton(*args, **kwargs):  # replaced by the kernels' launcher
    raise NotImplementedError("the Triton mLSTM kernels are not built yet; use backend='chunkwise'")


def mlstm_step_triton(*args, **kwargs):
    raise NotImplementedError("the Triton mLSTM step kernel is not built yet; use backend='torch'")
