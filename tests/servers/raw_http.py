"""Raw KServe-v2 HTTP requests (urllib, no PyTriton/tritonclient) for the critic-server tests, and a
directory-tree snapshot."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def tensor(name: str, array: np.ndarray) -> dict:
    """One KServe-v2 JSON input tensor (INT64, FP32 or BYTES)."""
    array = np.asarray(array)
    if array.dtype == object:
        return {"name": name, "datatype": "BYTES", "shape": list(array.shape), "data": [x.decode() for x in array.ravel()]}
    datatype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}[array.dtype]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}


def raw_infer_inputs(tokens, lengths) -> list[dict]:
    return [tensor("tokens", tokens), tensor("sequence_lengths", np.asarray(lengths, np.int64).reshape(-1, 1))]


def raw_train_inputs(tokens) -> list[dict]:
    f = np.zeros(tokens.shape, np.float32)
    return [tensor("tokens", tokens), tensor("returns", f), tensor("prev_values", f), tensor("mask", f + 1)]


def raw_path(path: str) -> list[dict]:
    return [tensor("path", np.array([path.encode()], dtype=object))]


def raw_infer(url: str, model: str, inputs: list[dict], token: str | None = None) -> tuple[int, str]:
    """POST ``/v2/models/<model>/infer`` (KServe v2 JSON) with urllib: ``(HTTP status, body or error text)``."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["triton-access-token"] = token
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer", data=json.dumps({"inputs": inputs}).encode(), headers=headers
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        try:
            return e.code, json.loads(body)["error"]
        except (ValueError, KeyError):
            return e.code, body


def one_line_reply(message: str) -> bool:
    """The server's error reply is one line, has no traceback and carries an error id."""
    return "\n" not in message.strip() and "Traceback" not in message and "CRITIC_REQUEST_ERROR (error id " in message


def tree(path: Path) -> dict[str, object]:
    """relative path -> file bytes / ('dir',) / ('link', target): a snapshot of everything under ``path``."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(path))
            if full.is_symlink():
                out[rel] = ("link", os.readlink(full))
            elif full.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = full.read_bytes()
    return out
