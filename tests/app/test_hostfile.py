
import pytest

from conftest import REPO
from pipeinfer_cpu.app.hostfile import Host, machinefile_lines, parse_hostfile, parse_line
from pipeinfer_cpu.errors import HostfileError


@pytest.mark.parametrize("line, expected", [
    ("node1", Host("node1")),
    ("node2:4", Host("node2", 4)),
    ("node3 slots=4", Host("node3", 4)),
    ("node3  slots = 2 max_slots=8", Host("node3", 2)),
    ("10.0.0.7:2  # weight=2.5", Host("10.0.0.7", 2, 2.5)),
    ("node4 # weight=0.5 an old laptop", Host("node4", 1, 0.5)),
    ("node5  # just a comment", Host("node5")),
    ("node6:2 # threads=6 weight=2 a faster box", Host("node6", 2, 2.0, 6)),
    ("node7 # weight = 1.5  threads = 3", Host("node7", 1, 1.5, 3)),
])
def test_parses_mpich_and_openmpi_syntax(line, expected):
    assert parse_line(line, "f:1") == expected


@pytest.mark.parametrize("line", ["", "   ", "# comment only", "  # weight=3"])
def test_blank_and_comment_lines_are_skipped(line):
    assert parse_line(line, "f:1") is None


@pytest.mark.parametrize("line, fragment", [
    ("node2 slot=4", "cannot parse 'node2 slot=4'"),
    ("node2:x", "cannot parse"),
    ("node2 # weight=-1", "bad weight"),
    ("node2 # weight=fast", "bad weight"),
    ("node2 # threads=0", "bad threads"),
    ("node2 # threads=two", "bad threads"),
    ("node2:0", "slots must be at least 1"),
])
def test_errors_name_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "hosts.txt"
    path.write_text(f"# lab\nnode1\n{line}\n")
    with pytest.raises(HostfileError) as error:
        parse_hostfile(path)
    assert f"{path}:3" in str(error.value) and fragment in str(error.value)


def test_missing_and_empty_hostfiles(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        parse_hostfile(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(HostfileError, match="no hosts"):
        parse_hostfile(tmp_path / "empty.txt")


def test_shipped_hostfiles_parse():
    assert parse_hostfile(REPO / "hosts" / "local.txt") == (Host("localhost"), Host("localhost"))
    lab = parse_hostfile(REPO / "hosts" / "lab.txt")
    assert [h.name for h in lab] == ["node1", "node2", "node3", "node4"]
    assert [h.weight for h in lab] == [1.5, 1.0, 1.0, 0.5]


def test_machinefile_groups_consecutive_ranks():
    assert machinefile_lines(("a", "a", "b", "c", "c", "a")) == ["a:2", "b:1", "c:2", "a:1"]
