"""The CLIP models of one process: each loaded once, shared by the process's search, indexer and re-embed,
and released when the last of them lets go.

    Models.configured()      the model of CLIPDEX_MODEL / CLIPDEX_PRETRAINED / CLIPDEX_MODEL_CONFIGS
    Models.for_space(space)  the model a store's space was written with, loaded from what the store
                             recorded (after a switch, every process loads the new model this way)
    Models.release(model)    one user fewer; the model is closed when none is left

`clipdex run` hands one `Models` to its server and its indexer, so a switch loads the new model once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import ModelMismatchError
from shared.roles import Space

logger = logging.getLogger(__name__)

_Key = tuple[str, str, str]  # model, pretrained, configs folder


@dataclass
class _Loaded:
    embedder: Embedder
    users: int
    owned: bool  # False: given by the caller, who closes it


class Models:
    def __init__(self, settings: Settings, *, given: Embedder | None = None) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._loaded: dict[_Key, _Loaded] = {}
        if given is not None:
            spec = given.spec
            key = (spec.name, spec.pretrained or "none", str(spec.configs_dir))
            self._loaded[key] = _Loaded(given, 0, owned=False)
            self._configured_key = key
        else:
            self._configured_key = _key(settings)

    def configured(self) -> Embedder:
        """The configured model, loaded (blocking: seconds the first time)."""
        return self._acquire(self._configured_key, self.settings)

    def for_space(self, space: Space) -> Embedder:
        """The model of `space`, loaded with this process's device, precision and runtime; refused
        (ModelMismatchError) when the weights found are not the ones the space was written with."""
        assert space.model is not None, "a space that was written to has its model recorded"
        model = space.model
        configs = Path(space.model_configs) if space.model_configs else self.settings.model_configs
        settings = self.settings.model_copy(
            update={"model": model.name, "pretrained": model.pretrained, "model_configs": configs}
        )
        embedder = self._acquire(_key(settings), settings)
        if not embedder.identity.same_weights(model):
            self.release(embedder)
            raise ModelMismatchError(
                f"the weights loaded for {model.name} / {model.pretrained} (checksum "
                f"{embedder.identity.checksum[:12]}) are not the ones the store's space was written with "
                f"({model.checksum[:12]}): is the checkpoint at that path another file here?"
            )
        return embedder

    def _acquire(self, key: _Key, settings: Settings) -> Embedder:
        with self._lock:  # a second user of a model that is loading waits for it instead of loading it again
            loaded = self._loaded.get(key)
            if loaded is None:
                embedder = Embedder.from_settings(settings)
                try:
                    embedder.load()
                except BaseException:
                    embedder.close()
                    raise
                loaded = self._loaded[key] = _Loaded(embedder, 0, owned=True)
            loaded.users += 1
            return loaded.embedder

    def release(self, embedder: Embedder) -> None:
        with self._lock:
            for key, loaded in list(self._loaded.items()):
                if loaded.embedder is embedder:
                    loaded.users -= 1
                    if loaded.users <= 0 and loaded.owned:  # a given model stays: its owner closes it
                        del self._loaded[key]
                        logger.info("released model %s", embedder.spec.name)
                        embedder.close()
                    return

    def close(self) -> None:
        with self._lock:
            for loaded in self._loaded.values():
                if loaded.owned:
                    loaded.embedder.close()
            self._loaded.clear()


def _key(settings: Settings) -> _Key:
    pretrained = "none" if settings.random_weights else settings.pretrained
    return (settings.model, pretrained, str(settings.model_configs))
