"""The client: one method per endpoint of the inspector's API (``/v1``)."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Union
from urllib.parse import urlencode

JsonValue = Any
"""A decoded JSON value, shaped as the API's schema for the endpoint says."""

#: Bytes read per ``recv`` while streaming physical memory.
STREAM_CHUNK = 1 << 20
#: The largest JSON reply accepted; the API's largest (a full process or VMA list) is far smaller.
MAX_JSON_REPLY = 64 << 20
#: The longest single SSE line accepted; the inspector's events are far smaller.
MAX_EVENT_LINE = 1 << 20
#: The largest BTF blob accepted (specula-os parses at most 64 MiB).
MAX_BTF_BYTES = 64 << 20


class ApiError(Exception):
    """A request the API refused or failed: its HTTP status and the API's error body.

    ``code`` is the API's stable error code (``bad_request``, ``forbidden``,
    ``policy_denied``, ``not_found``, ``not_granted``, ``source_gone``,
    ``unsupported``, ``os_error``, ``agent_error``, ``source_error``, ``internal``).
    """

    def __init__(self, status: int, code: str, message: str, request_id: Optional[int]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Event:
    """One event from ``/v1/events``: its sequence number, kind, time and detail."""

    seq: int
    kind: str
    time_ms: Optional[int]
    detail: Dict[str, Any]


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection whose transport is a Unix stream socket."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot connect to the Specula API at {self._path}: {e}") from e
        self.sock = sock


def _addr(value: int) -> str:
    """Addresses and lengths travel as hex strings in request bodies."""
    if value < 0:
        raise ValueError(f"negative address or length: {value}")
    return hex(value)


class Client:
    """A client of one inspector's API socket.

    Each call opens its own connection, so one ``Client`` may be shared by
    threads. ``timeout`` (seconds) bounds every socket operation but the event
    stream's wait for the next event.
    """

    def __init__(self, socket_path: str, timeout: Optional[float] = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # -- transport -------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, Union[int, str]]] = None,
        body: Optional[Dict[str, Any]] = None,
        timeout: Optional[float] = -1.0,
    ) -> http.client.HTTPResponse:
        url = "/v1" + path
        if query:
            url += "?" + urlencode(query)
        conn = _UnixConnection(self.socket_path, self.timeout if timeout == -1.0 else timeout)
        headers = {"host": "specula"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        conn.request(method, url, body=data, headers=headers)
        response = conn.getresponse()
        if response.status >= 400:
            raw = response.read(1 << 16)
            conn.close()
            raise self._error(response.status, raw, response.getheader("x-request-id"))
        return response

    @staticmethod
    def _error(status: int, raw: bytes, request_id: Optional[str]) -> ApiError:
        try:
            err = json.loads(raw)
            return ApiError(status, str(err["code"]), str(err["message"]), err.get("request_id"))
        except (ValueError, KeyError, TypeError):
            rid = int(request_id) if request_id and request_id.isdigit() else None
            return ApiError(status, "http_error", raw.decode("utf-8", "replace")[:500], rid)

    def _json(self, method: str, path: str, **kwargs: Any) -> JsonValue:
        response = self._request(method, path, **kwargs)
        try:
            raw = response.read(MAX_JSON_REPLY + 1)
        finally:
            response.close()
        if len(raw) > MAX_JSON_REPLY:
            raise ValueError(f"{method} {path}: reply over {MAX_JSON_REPLY} bytes")
        return json.loads(raw) if raw else None

    # -- source and grants -----------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """The source's kind and state, grant and memslot counts, the newest event's number."""
        return self._json("GET", "/status")

    def grants(self) -> List[Dict[str, int]]:
        """The granted guest-physical ranges: ``{id, gpa, len}`` each."""
        return self._json("GET", "/grants")

    def vcpus(self) -> List[Dict[str, int]]:
        """The source's vCPU registers (index, rip, rflags, gprs[16] with RSP at 6, cr0-cr4, efer, fs/gs bases, the syscall MSRs)."""
        return self._json("GET", "/vcpus")

    def pause(self) -> None:
        """Pause the source (QEMU, or a Specula source started with --mirror-allow-pause)."""
        self._json("POST", "/source/pause")

    def resume(self) -> None:
        """Resume a source this client paused."""
        self._json("POST", "/source/resume")

    # -- physical memory -------------------------------------------------------

    def read_physical(self, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest-physical memory at ``gpa``, whole."""
        return b"".join(self.iter_physical(gpa, length))

    def iter_physical(self, gpa: int, length: int, chunk: int = STREAM_CHUNK) -> Iterator[bytes]:
        """Guest-physical memory at ``gpa`` as it streams in, ``chunk`` bytes at a time at most.

        Raises ``ApiError`` before the first chunk if the range is not granted,
        and ``ConnectionError`` if the stream ends short.
        """
        response = self._request("GET", "/memory/physical", query={"gpa": _addr(gpa), "len": length})
        received = 0
        try:
            while received < length:
                data = response.read(min(chunk, length - received))
                if not data:
                    raise ConnectionError(f"stream ended after {received} of {length} bytes")
                received += len(data)
                yield data
        finally:
            response.close()

    def read_physical_into(self, gpa: int, length: int, out: BinaryIO) -> int:
        """Stream guest-physical memory into a file object; returns the bytes written."""
        written = 0
        for data in self.iter_physical(gpa, length):
            out.write(data)
            written += len(data)
        return written

    def read_physical_hex(self, gpa: int, length: int) -> bytes:
        """A small read (at most 64 KiB) through the JSON hex endpoint, decoded."""
        reply = self._json("GET", "/memory/physical/hex", query={"gpa": _addr(gpa), "len": length})
        return bytes.fromhex(reply["hex"])

    def hash(self, gpa: int, length: int) -> Dict[str, str]:
        """SHA-256 and XXH64 of a granted range, computed in the agent."""
        return self._json("POST", "/hash", body={"gpa": _addr(gpa), "len": _addr(length)})

    def scan(self, gpa: int, length: int, pattern: bytes, offset: int = 0, limit: Optional[int] = None) -> Dict[str, Any]:
        """One page of the GPAs where ``pattern`` occurs: ``{hits, total, next_offset}``."""
        body: Dict[str, Any] = {"gpa": _addr(gpa), "len": _addr(length), "pattern": pattern.hex(), "offset": offset}
        if limit is not None:
            body["limit"] = limit
        return self._json("POST", "/scan", body=body)

    def scan_all(self, gpa: int, length: int, pattern: bytes, page: int = 1000) -> List[int]:
        """Every hit of ``pattern`` in the range, following the pages."""
        hits: List[int] = []
        offset: Optional[int] = 0
        while offset is not None:
            result = self.scan(gpa, length, pattern, offset=offset, limit=page)
            hits.extend(result["hits"])
            offset = result.get("next_offset")
        return hits

    # -- watches ---------------------------------------------------------------

    def create_watch(self, gpa: int, length: int) -> Dict[str, Any]:
        """Watch a granted range for changes; returns the watch (its ``id``, ``mode``...)."""
        return self._json("POST", "/watches", body={"gpa": _addr(gpa), "len": _addr(length)})

    def list_watches(self) -> List[Dict[str, Any]]:
        """The active watches."""
        return self._json("GET", "/watches")

    def delete_watch(self, watch_id: int) -> None:
        """Stop a watch."""
        self._json("DELETE", f"/watches/{int(watch_id)}")

    def findings(self, watch_id: int) -> List[Dict[str, Any]]:
        """A watch's findings: the event ``seq``, the written ``pages`` and, of those, the
        ``restored`` ones (written and put back between two checks) of each."""
        return self._json("GET", f"/watches/{int(watch_id)}/findings")

    # -- tracing ---------------------------------------------------------------

    def trace_start(self, kinds: Optional[Iterable[str]] = None, software_breakpoints: bool = False) -> Dict[str, Any]:
        """Trace the source's guest (a Specula vmm started with ``--mirror-allow-trace``):
        the ``kinds`` named (``msr_writes``, ``exec``, ``exit``, ``module_load``, ``kernel_writes``; every kind
        when none) arrive on :meth:`events` as ``trace.*`` events. Breakpoints use the
        debug registers, or ``int3`` over no-ops with ``software_breakpoints``. Returns where
        tracing stands (``kinds``, ``breakpoints``, ``max_per_second``, ``events``,
        ``dropped``)."""
        body = {"kinds": list(kinds or []), "software_breakpoints": software_breakpoints}
        return self._json("POST", "/trace", body=body)

    def trace_stop(self) -> Dict[str, Any]:
        """Stop tracing; the source disarms what no inspector traces."""
        return self._json("DELETE", "/trace")

    def trace_status(self) -> Dict[str, Any]:
        """What is traced, and how many trace events were reported and dropped."""
        return self._json("GET", "/trace")

    # -- events ----------------------------------------------------------------

    def events(self, since: Optional[int] = None, kinds: Optional[Iterable[str]] = None) -> Iterator[Event]:
        """Follow the event stream (server-sent events), from after ``since`` if given.

        ``kinds`` filters by kind or prefix (``watch``, ``grant.revoked``...). The
        iterator blocks for the next event; close it (or break) to hang up.
        """
        query: Dict[str, Union[int, str]] = {}
        if since is not None:
            query["since"] = since
        if kinds:
            query["kinds"] = ",".join(kinds)
        response = self._request("GET", "/events", query=query or None, timeout=None)
        try:
            data: List[str] = []
            while True:
                line = response.readline(MAX_EVENT_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_EVENT_LINE:
                    raise ValueError(f"event line over {MAX_EVENT_LINE} bytes")
                text = line.decode("utf-8").rstrip("\r\n")
                if text.startswith("data:"):
                    data.append(text[5:].lstrip(" "))
                elif text == "" and data:
                    yield self._event(json.loads("\n".join(data)))
                    data = []
        finally:
            response.close()

    @staticmethod
    def _event(raw: Dict[str, Any]) -> Event:
        return Event(
            seq=int(raw["seq"]),
            kind=str(raw["kind"]),
            time_ms=raw.get("time_ms"),
            detail=raw.get("detail") or {},
        )

    # -- operating-system views (Linux guests) ---------------------------------

    def os_discover(self) -> Dict[str, Any]:
        """Find the guest kernel again (VMCOREINFO, KASLR, BTF, kallsyms); returns the kernel view."""
        return self._json("POST", "/os/discover")

    def os_kernel(self) -> Dict[str, Any]:
        """The guest kernel: release, KASLR offset, phys_base, symbol and type counts."""
        return self._json("GET", "/os/kernel")

    def os_processes(self) -> List[Dict[str, Any]]:
        """The guest's processes (pid, tgid, ppid, uids, comm, args, state...), from the task list."""
        return self._json("GET", "/os/processes")

    def os_process(self, pid: int) -> Dict[str, Any]:
        """One process of the guest, by pid (``ApiError`` with code ``not_found`` if none)."""
        return self._json("GET", f"/os/processes/{int(pid)}")

    def os_maps(self, pid: int) -> List[Dict[str, Any]]:
        """A process's memory areas, as in /proc/PID/maps."""
        return self._json("GET", f"/os/processes/{int(pid)}/maps")

    def os_memory(self, pid: int, va: int, length: int) -> bytes:
        """``length`` bytes (at most 1 MiB) of a process's virtual memory at ``va``."""
        response = self._request("GET", f"/os/processes/{int(pid)}/memory", query={"va": _addr(va), "len": length})
        try:
            return response.read(length)
        finally:
            response.close()

    def os_modules(self) -> List[Dict[str, Any]]:
        """The guest's loaded kernel modules: name, base, size, state."""
        return self._json("GET", "/os/modules")

    def os_check_syscalls(self) -> Dict[str, Any]:
        """System call table entries pointing outside the core kernel's text, with their module."""
        return self._json("GET", "/os/checks/syscalls")


    def os_checks(self, only: Optional[Iterable[str]] = None) -> Dict[str, Any]:
        """Rootkit checks (all, or ``only`` those named: processes, modules, syscalls,
        interrupts, kernel_text; msrs when named): ``clean``, each check's run and every finding."""
        query = {"only": ",".join(only)} if only else None
        return self._json("GET", "/os/checks", query=query)

    def os_symbols(self) -> List[Dict[str, Any]]:
        """Every kernel symbol (kallsyms from guest memory): name, kind, running address."""
        return self._json("GET", "/os/symbols")

    def os_btf(self) -> bytes:
        """The kernel's BTF type information, as bytes."""
        response = self._request("GET", "/os/btf")
        try:
            return response.read(MAX_BTF_BYTES + 1)[:MAX_BTF_BYTES]
        finally:
            response.close()

    def yara_scan(self, rules: str, pid: Optional[int] = None, kernel: bool = False) -> Dict[str, Any]:
        """Scans guest memory with YARA ``rules`` (source text): all granted physical memory,
        or process ``pid``'s virtual memory, or the kernel image (``kernel=True``). Returns
        ``scanned_bytes``, ``matches`` (rule, string, and gpa or pid and va) and ``truncated``."""
        target = "process" if pid is not None else "kernel" if kernel else "physical"
        body: Dict[str, Any] = {"rules": rules, "target": target}
        if pid is not None:
            body["pid"] = int(pid)
        return self._json("POST", "/yara", body=body)
