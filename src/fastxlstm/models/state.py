"""The model state types (defined in :mod:`fastxlstm.layers.state`, below the layers that own them)."""
from ..layers.state import MLSTMBlockState, SLSTMBlockState, XLSTMState

__all__ = ["MLSTMBlockState", "SLSTMBlockState", "XLSTMState"]
