"""Tools made possible by TriLoRA's exact SVD form, each writing a new file into the loras folder
(never replacing one; nodes/loras_folder.py): convert any LoRA/LoCon to TriLoRA and export a
TriLoRA as a kohya LoRA, both exactly (convert.py); extract a TriLoRA from two models
(extract.py); resize by rank or energy and merge with weights (resize.py); and look at a
spectrum (spectrum.py). What they share is in common.py."""
from __future__ import annotations

from .convert import TriLoRAConvertLoRA, TriLoRAExportLoRA
from .extract import TriLoRAExtract
from .resize import TriLoRAMerge, TriLoRAResize
from .spectrum import TriLoRASpectrum

NODES = [TriLoRAConvertLoRA, TriLoRAExportLoRA, TriLoRAExtract, TriLoRAResize, TriLoRAMerge, TriLoRASpectrum]
