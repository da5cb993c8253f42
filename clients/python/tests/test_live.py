"""The Python client against a live inspector.

Run by integration-tests/tests/python_client.rs, which starts a real source
`vmm` (the workload guest) and a real inspector serving its API, then passes
the socket and the workload's ground truth in SPECULA_* variables.
"""

import hashlib
import inspect
import os
import time
import typing
import unittest

import specula_client
from specula_client import ApiError, Client


def env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"{name} is not set: run these tests through integration-tests/tests/python_client.rs")
    return value


def env_int(name: str) -> int:
    return int(env(name), 0)


class LiveApi(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.client = Client(env("SPECULA_API"), timeout=60)
        cls.header_gpa = env_int("SPECULA_HEADER_GPA")
        cls.header_magic = bytes.fromhex(env("SPECULA_HEADER_MAGIC"))
        cls.text_gpa = env_int("SPECULA_TEXT_GPA")
        cls.text_len = env_int("SPECULA_TEXT_LEN")
        cls.text_sha256 = env("SPECULA_TEXT_SHA256")

    def test_status_grants_and_vcpus(self) -> None:
        st = self.client.status()
        self.assertEqual((st["source"], st["kind"], st["grants"]), ("attached", "specula", 128))
        grants = self.client.grants()
        self.assertEqual(len(grants), 128)
        self.assertEqual((grants[0]["gpa"], grants[0]["len"]), (0, 2 << 20))
        vcpus = self.client.vcpus()
        self.assertEqual(len(vcpus), 1)
        self.assertNotEqual(vcpus[0]["cr3"], 0)

    def test_a_streamed_read_equals_small_hex_reads(self) -> None:
        data = self.client.read_physical(self.header_gpa, 8 << 20)
        self.assertEqual(len(data), 8 << 20)
        self.assertEqual(data[:16], self.header_magic)
        at = self.text_gpa - self.header_gpa
        self.assertEqual(data[at : at + 4096], self.client.read_physical_hex(self.text_gpa, 4096))
        chunks = list(self.client.iter_physical(self.header_gpa, 3 << 20, chunk=1 << 20))
        self.assertTrue(all(len(c) <= 1 << 20 for c in chunks))
        # The header holds a live heartbeat; from the text on, the guest's memory is still.
        self.assertEqual(b"".join(chunks)[at:], data[at : 3 << 20])

    def test_errors_carry_the_apis_code_and_request_id(self) -> None:
        with self.assertRaises(ApiError) as caught:
            self.client.read_physical(0x20000000, 4096)
        err = caught.exception
        self.assertEqual((err.status, err.code), (409, "not_granted"))
        self.assertIsInstance(err.request_id, int)
        with self.assertRaises(ApiError) as caught:
            self.client.delete_watch(987654)
        self.assertEqual((caught.exception.status, caught.exception.code), (404, "not_found"))
        # The workload guest is not Linux: OS views fail with a clear os_error.
        with self.assertRaises(ApiError) as caught:
            self.client.os_kernel()
        self.assertEqual((caught.exception.status, caught.exception.code), (422, "os_error"))
        with self.assertRaises(ApiError) as caught:
            self.client.os_process(1)
        self.assertEqual((caught.exception.status, caught.exception.code), (422, "os_error"))
        # This source does not let inspectors pause it.
        with self.assertRaises(ApiError) as caught:
            self.client.pause()
        self.assertEqual((caught.exception.status, caught.exception.code), (403, "policy_denied"))
        with self.assertRaises(ValueError):
            self.client.hash(-1, 4096)

    def test_hash_and_paged_scan(self) -> None:
        # The text's first page is as the guest wrote it (the test modified the second).
        self.assertEqual(self.client.hash(self.text_gpa, 4096)["sha256"], self.text_sha256)
        # The agent's digest of the whole text equals one of the streamed bytes.
        digests = self.client.hash(self.text_gpa, self.text_len)
        streamed = self.client.read_physical(self.text_gpa, self.text_len)
        self.assertEqual(digests["sha256"], hashlib.sha256(streamed).hexdigest())
        hits = self.client.scan_all(0x1000000, 0x100000, b"postgres", page=3)
        self.assertEqual(len(hits), 8)
        self.assertEqual(hits, sorted(set(hits)))
        page = self.client.scan(0x1000000, 0x100000, b"postgres", limit=3)
        self.assertEqual((page["total"], page["hits"], page["next_offset"]), (8, hits[:3], 3))
        for gpa in hits:
            self.assertEqual(self.client.read_physical_hex(gpa, 8), b"postgres")

    def test_watch_lifecycle(self) -> None:
        watch = self.client.create_watch(self.text_gpa, 4096)
        self.assertIn(watch["id"], [w["id"] for w in self.client.list_watches()])
        self.client.delete_watch(watch["id"])
        self.assertNotIn(watch["id"], [w["id"] for w in self.client.list_watches()])

    def test_a_change_the_guest_made_is_a_finding_and_an_event(self) -> None:
        watch_id = env_int("SPECULA_WATCH_ID")
        changed = env_int("SPECULA_CHANGED_PAGE")
        deadline = time.monotonic() + 30
        findings = self.client.findings(watch_id)
        while not findings:
            self.assertLess(time.monotonic(), deadline, "no finding within 30 s of the guest's write")
            time.sleep(0.05)
            findings = self.client.findings(watch_id)
        self.assertIn(changed, findings[0]["pages"])
        # The event stream replays the backlog from the start, filtered by kind.
        stream = self.client.events(since=0, kinds=["watch"])
        event = next(stream)
        stream.close()
        self.assertEqual((event.kind, event.seq), ("watch.changed", findings[0]["seq"]))
        self.assertEqual(event.detail["watch"], watch_id)
        self.assertIn(changed, event.detail["pages"])
        self.assertIsInstance(event.time_ms, int)


class PublicSurface(unittest.TestCase):
    def test_every_public_function_has_a_docstring_and_type_hints(self) -> None:
        public = [specula_client.Client, specula_client.ApiError, specula_client.Event]
        for cls in public:
            self.assertTrue(inspect.getdoc(cls), f"{cls.__name__} has no docstring")
        for name, fn in inspect.getmembers(Client, inspect.isfunction):
            if name.startswith("_"):
                continue
            self.assertTrue(inspect.getdoc(fn), f"Client.{name} has no docstring")
            hints = typing.get_type_hints(fn)
            self.assertIn("return", hints, f"Client.{name} has no return type")
            params = [p for p in inspect.signature(fn).parameters if p != "self"]
            for p in params:
                self.assertIn(p, hints, f"Client.{name}({p}) has no type")

    def test_every_api_operation_has_a_method(self) -> None:
        import json
        import pathlib

        doc = json.loads((pathlib.Path(__file__).resolve().parents[3] / "docs" / "openapi.json").read_text())
        operations = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
        names = {name for name, _ in inspect.getmembers(Client, inspect.isfunction)}
        renamed = {"event_stream": "events"}
        missing = sorted(op for op in operations if renamed.get(op, op) not in names)
        self.assertEqual(missing, [], "API operations with no client method")


if __name__ == "__main__":
    unittest.main()
