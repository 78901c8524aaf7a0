"""What every exported artifact directory holds besides its programs: ``manifest.json``, the
checkpoint's ``config.json`` and its processor files."""
from __future__ import annotations

import json
import os

from blip_core.configs import load_config


class Artifact:
    """Base of the runners: reads and checks the manifest, the config, and the processor on first use."""

    FORMAT = ""      # the manifest's "format" this runner reads
    KIND = ""        # how an error names the artifact

    def _open(self, path) -> str:
        path = os.fspath(path)
        with open(os.path.join(path, "manifest.json")) as fh:
            self.manifest = json.load(fh)
        if self.manifest.get("format") != self.FORMAT:
            raise ValueError(f"{path} is not a {self.KIND} (manifest format {self.manifest.get('format')!r})")
        self.path, self.config, self._processor = path, load_config(path), None
        return path

    @property
    def image_size(self) -> int:
        """The square pixel size the artifact's programs take (the config's unless exported at another)."""
        return int(self.manifest.get("image_size") or self.config.vision_config.image_size)

    @property
    def processor(self):
        if self._processor is None:
            from blip_core.processing import BlipProcessor
            self._processor = BlipProcessor.from_pretrained(self.path)
        return self._processor
