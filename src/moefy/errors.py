"""Errors users can act on.  Each carries a one-line message and its own process exit code.

The CLI prints ``error: <message>`` and exits with ``exit_code``; no traceback.
"""

from __future__ import annotations


class MoefyError(Exception):
    """Base class: a one-line, user-facing problem."""

    exit_code = 1


class ModelNotFoundError(MoefyError):
    exit_code = 3


class UnsupportedModelError(MoefyError):
    exit_code = 4


class CorruptModelError(MoefyError):
    exit_code = 5


class CalibrationDataError(MoefyError):
    exit_code = 6


class NonFiniteLossError(MoefyError):
    exit_code = 7


class OutOfMemoryError(MoefyError):
    exit_code = 8


class OutputExistsError(MoefyError):
    exit_code = 9


class TooFewExpertsError(MoefyError):
    """E < 2."""

    exit_code = 10


class TopKTooSmallError(MoefyError):
    """k < 1."""

    exit_code = 11


class TopKTooLargeError(MoefyError):
    """k > E."""

    exit_code = 12


class TooManyExpertsError(MoefyError):
    """E > d_ffn (an expert would have no neuron)."""

    exit_code = 13


class ConfigError(MoefyError):
    """Any other invalid option value."""

    exit_code = 14


class ExportRefusedError(MoefyError):
    """An export that would change the model's outputs."""

    exit_code = 15


class TeacherMismatchError(MoefyError):
    """The teacher is not the dense model the student was converted from (vocabulary, shape)."""

    exit_code = 16


class MemoryBudgetError(MoefyError):
    """A ``--max-memory`` budget that cannot hold even one layer of the conversion."""

    exit_code = 17


class DiskFullError(MoefyError):
    """No space left on the device while writing (calibration activations, layers, the checkpoint)."""

    exit_code = 18


class InterruptedRun(MoefyError):
    exit_code = 130
