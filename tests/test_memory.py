"""Memory handed back as a compression goes: the dense weights' pages mapped from a checkpoint, never what the
process wrote."""

import sys

import pytest
import torch

from peft_basis.memory import release_pages, trim_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / pagemap: Linux only")
PAGE_FLOATS = 1024  # 4 KiB pages of float32


def _mapped(tmp_path, n):
    path = tmp_path / "w.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    return torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)  # a private file mapping


def _resident_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile")


def test_unwritten_file_pages_are_released_and_read_back_the_same(tmp_path):
    n = 8192 * PAGE_FLOATS  # 32 MiB: well above what the interpreter pages in meanwhile
    t = _mapped(tmp_path, n)
    assert float(t.double().sum()) == n * (n - 1) / 2  # every page read: resident
    before = _resident_file_kb()
    released = release_pages(t)
    assert released >= (n - 2 * PAGE_FLOATS) * 4  # the whole pages inside it (the mapping may start mid-page)
    assert _resident_file_kb() <= before - released // 1024 + 2048
    assert torch.equal(t, torch.arange(n, dtype=torch.float32))  # read back from the file


def test_written_pages_are_kept(tmp_path):
    n = 16 * PAGE_FLOATS
    t = _mapped(tmp_path, n)
    float(t.sum())
    t[5 * PAGE_FLOATS + 3] = -1.0  # copy-on-write: that page is the process's own now
    released = release_pages(t)
    assert 0 < released <= (n - PAGE_FLOATS) * 4
    expected = torch.arange(n, dtype=torch.float32)
    expected[5 * PAGE_FLOATS + 3] = -1.0
    assert torch.equal(t, expected)


def test_anonymous_memory_is_left_alone():
    t = torch.arange(64 * PAGE_FLOATS, dtype=torch.float32)
    assert release_pages(t) == 0 and release_pages(torch.empty(0)) == 0
    assert torch.equal(t, torch.arange(64 * PAGE_FLOATS, dtype=torch.float32))
    trim_memory()  # returns what glibc holds; nothing to check but that it runs
