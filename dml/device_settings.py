"""What the device decides for the training module: the backbone's memory format (channels-last
on CUDA unless ``model.backbone.channels_last`` says otherwise) and its compilation
(``model.compile``).

``DeviceSettings`` is a part of ``DMLModule`` (a mixin): Lightning's ``setup`` hook, in
``dml/module.py``, calls ``apply_device_settings`` before it moves the module to its device and
wraps it for DDP (``.to(device)`` keeps the memory format). The compiled backbone is kept
outside the module tree, so the weights, their names and the checkpoints stay the plain
module's; ``DMLModule.embed`` runs it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from dml.errors import ConfigError

COMPILE_MODES = (
    False,
    True,
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)


def check_compile(setting: Union[bool, str]) -> None:
    if setting not in COMPILE_MODES:
        raise ConfigError(
            f"model.compile: expected true, false or a torch.compile mode "
            f"(default, reduce-overhead, max-autotune), got {setting!r}"
        )


class DeviceSettings:
    """Expects the attributes ``backbone``, ``channels_last_setting`` (True, False or None:
    the device decides) and ``compile_setting``."""

    def init_device_settings(
        self, channels_last: Optional[bool], compile: Union[bool, str]
    ) -> None:
        check_compile(compile)
        self.channels_last_setting, self.compile_setting = channels_last, compile
        self.__dict__["compiled_backbone"] = None

    @property
    def compiled_backbone(self) -> Optional[torch.nn.Module]:
        return self.__dict__.get("compiled_backbone")

    @property
    def uses_channels_last(self) -> bool:
        return bool(getattr(self, "channels_last_active", False))

    def apply_device_settings(self, device: torch.device) -> None:
        wanted = self.channels_last_setting
        if wanted is None:
            wanted = device.type == "cuda"
        self.channels_last_active = bool(wanted) and self.backbone.convolutional
        if self.channels_last_active:
            self.backbone.to(memory_format=torch.channels_last)
        if self.compile_setting and self.compiled_backbone is None:
            mode = None if self.compile_setting is True else self.compile_setting
            self.__dict__["compiled_backbone"] = torch.compile(self.backbone, mode=mode)
