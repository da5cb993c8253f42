"""Volatility 3 on a live VM through Specula: the ``specula://`` URL scheme.

Use it as a Volatility plugin directory::

    vol -p clients/python/volatility -f specula:///run/specula/api.sock linux.pslist

``specula://SOCKET`` opens the guest-physical memory that the inspector serving its
API on SOCKET can read, as a seekable file that Volatility's ``FileLayer`` stacks
its Linux layers on. Reads go through ``GET /v1/memory/physical`` in aligned
blocks kept in a bounded LRU cache (Volatility reads the same page tables and
structures over and over); ranges the inspector cannot read (not granted, holes
in guest RAM) read as zeros, as they would in a memory image.

On import this module adds Specula's symbol directory
(``$XDG_CACHE_HOME/specula/volatility``, where ``specula isf`` writes) to
Volatility's symbol path and, when the command line names a ``specula://``
location, runs ``specula --socket SOCKET isf`` so that a symbol table built from
the guest's own BTF and kallsyms is there before Volatility looks: no
dwarf2json, no debug package. ``SPECULA_BIN`` names the ``specula`` binary
(default: ``specula`` on PATH).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from collections import OrderedDict
from typing import List, Optional

import volatility3.symbols
from volatility3.framework.layers import resources

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from specula_client import ApiError, Client  # noqa: E402  (the package beside this directory)

vollog = logging.getLogger(__name__)

#: Bytes fetched per request; Volatility's reads are mostly a page or less.
BLOCK = 1 << 16
#: Most blocks cached (64 MiB).
CACHE_BLOCKS = 1024


def symbol_dir() -> str:
    """Where ``specula isf`` writes symbol tables (their ``linux/`` subdirectory)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "specula", "volatility")


def socket_of(url: str) -> str:
    """The API socket path of a ``specula://`` URL."""
    parsed = urllib.parse.urlparse(url)
    path = urllib.parse.unquote(parsed.netloc + parsed.path)
    if not path:
        raise ValueError(f"{url}: no socket path (specula:///path/to/api.sock)")
    return path


class SpeculaMemory(io.RawIOBase):
    """Guest-physical memory behind an inspector's API, as a read-only seekable file."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.client = Client(socket_path)
        self.size = int(self.client.status()["window_len"])
        self.position = 0
        self.cache: "OrderedDict[int, bytes]" = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def _block(self, index: int) -> bytes:
        block = self.cache.get(index)
        if block is not None:
            self.cache.move_to_end(index)
            return block
        start = index * BLOCK
        length = min(BLOCK, self.size - start)
        try:
            block = self.client.read_physical(start, length)
        except ApiError:
            block = b""
        if len(block) != length:
            block = self._pagewise(start, length)
        self.cache[index] = block
        if len(self.cache) > CACHE_BLOCKS:
            self.cache.popitem(last=False)
        return block

    def _pagewise(self, start: int, length: int) -> bytes:
        """A block that straddles something unreadable: page by page, zeros where refused."""
        out = bytearray()
        for page in range(start, start + length, 4096):
            n = min(4096, start + length - page)
            try:
                data = self.client.read_physical(page, n)
            except ApiError:
                data = b""
            out += data if len(data) == n else bytes(n)
        return bytes(out)

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        want = min(len(buffer), max(0, self.size - self.position))
        done = 0
        while done < want:
            at = self.position + done
            block = self._block(at // BLOCK)
            offset = at % BLOCK
            n = min(want - done, len(block) - offset)
            buffer[done : done + n] = block[offset : offset + n]
            done += n
        self.position += done
        return done


class SpeculaHandler(resources.VolatilityHandler):
    """Opens ``specula://SOCKET`` URLs for Volatility's resource accessor."""

    @classmethod
    def non_cached_schemes(cls) -> List[str]:
        return ["specula"]

    @staticmethod
    def specula_open(req: urllib.request.Request) -> SpeculaMemory:
        return SpeculaMemory(socket_of(req.full_url))


def _ensure_symbol_table(argv: List[str]) -> None:
    """Runs ``specula isf`` for a ``specula://`` location on the command line."""
    locations = [a for a in argv if a.startswith("specula://")]
    locations += [a.split("=", 1)[1] for a in argv if a.startswith("--single-location=specula://")]
    specula = os.environ.get("SPECULA_BIN", "specula")
    for url in locations:
        try:
            done = subprocess.run(
                [specula, "--socket", socket_of(url), "isf"], capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            vollog.warning(f"specula isf for {url}: {e}")
            continue
        if done.returncode != 0:
            vollog.warning(f"specula isf for {url} failed: {done.stderr.strip()}")


if symbol_dir() not in volatility3.symbols.__path__:
    volatility3.symbols.__path__.append(symbol_dir())
_ensure_symbol_table(sys.argv)
