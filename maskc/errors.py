"""maskc's exceptions: one base class, one subclass per situation a user meets.

Every message says what was wrong, what was expected, and what to do.
"""
from __future__ import annotations


class MaskcError(Exception):
    """Base class of every error maskc raises on purpose."""


class CaptureError(MaskcError):
    """The backbone could not be turned into a block-granular fx graph."""


class BlockError(MaskcError):
    """A block list is unusable (unknown name, nested blocks, block not called once)."""


class MaskShapeError(MaskcError, ValueError):
    """Mask bits have the wrong shape, dtype or do not match the names."""


class MaskMismatchError(MaskcError):
    """A mask was made for another model, scheduler or step count."""


class EmptyCacheError(MaskcError):
    """A mask skips a block at a step before the block has ever run."""


class StepOverflowError(MaskcError):
    """TimestepModules was called more than T times without reset()."""


class InputChangedError(MaskcError):
    """Inputs changed shape, dtype or device in the middle of a generation."""


class MaskFileError(MaskcError):
    """A mask file is corrupt, truncated, or of an unknown format."""
