"""``blip cache info`` and ``blip cache clear``: the persistent compilation cache (``blip_core.persistent_cache``).

``info`` prints the folder, whether the cache is on, its bound and the size of each framework's part;
``clear`` deletes the folder (every framework's programs; the next process compiles again).
"""
from __future__ import annotations

import json
import os

from blip_core import persistent_cache


def cache_info() -> dict:
    top = persistent_cache.root()
    parts = {}
    if top is not None and os.path.isdir(top):
        for name in sorted(os.listdir(top)):
            path = os.path.join(top, name)
            if os.path.isdir(path):
                parts[name] = {"files": sum(len(f) for _, _, f in os.walk(path)),
                               "mb": round(persistent_cache.folder_size(path) / 2**20, 2)}
    limit = persistent_cache.max_bytes()
    return {"folder": top, "on": top is not None, "max_mb": None if limit is None else round(limit / 2**20, 2),
            "mb": round(sum(p["mb"] for p in parts.values()), 2), "parts": parts}


def cmd_cache(args) -> int:
    if args.action == "clear":
        top = persistent_cache.clear_persistent_cache()
        print("persistent cache is off (BLIP_COMPILE_CACHE=0): nothing to clear" if top is None else f"cleared {top}")
        return 0
    info = cache_info()
    if args.json:
        print(json.dumps(info))
        return 0
    if not info["on"]:
        print("persistent compilation cache: off (BLIP_COMPILE_CACHE=0)")
        return 0
    bound = "unbounded" if info["max_mb"] is None else f"at most {info['max_mb']} MB"
    print(f"persistent compilation cache: {info['folder']} ({info['mb']} MB, {bound})")
    for name, part in info["parts"].items():
        print(f"  {name:<28} {part['files']:>5} files {part['mb']:>10.2f} MB")
    return 0


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the persistent compilation cache of the jax and tf backends")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)
