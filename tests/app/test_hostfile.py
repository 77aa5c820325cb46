
import pytest

from conftest import REPO
from pipeinfer_cpu.app.hostfile import Host, machinefile_lines, parse_hostfile, parse_line, set_weights, with_weight
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


# -- set_weights: the hostfile `hosts calibrate` writes ---------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("node1", "node1  # weight=1.50"),
    ("node1   ", "node1  # weight=1.50"),
    ("node2:4", "node2:4  # weight=1.50"),
    ("node3 slots=4 max_slots=8", "node3 slots=4 max_slots=8  # weight=1.50"),
    ("node4:1          # weight=0.5   an old laptop", "node4:1          # weight=1.50   an old laptop"),
    ("node5  # just a comment", "node5  # weight=1.50 just a comment"),
    ("node6:2 # threads=6 weight=2 a faster box", "node6:2 # threads=6 weight=1.50 a faster box"),
    ("node7 # threads = 3 fast", "node7 # weight=1.50 threads = 3 fast"),
    ("node8 # weight = 2", "node8 # weight = 1.50"),
    ("node9 #", "node9 # weight=1.50"),
    ("node9 #threads=2", "node9 # weight=1.50 threads=2"),
    ("node10 # fast box, weight=3 later is free text", "node10 # weight=1.50 fast box, weight=3 later is free text"),
])
def test_with_weight_keeps_the_rest_of_the_line(line, expected):
    assert with_weight(line, 1.5) == expected
    before, after = parse_line(line, "f:1"), parse_line(expected, "f:1")
    assert after == Host(before.name, before.slots, 1.5, before.threads)


def test_set_weights_keeps_comment_lines_blank_lines_and_line_ends():
    text = "# lab\r\nnode1:2 # weight=9 head here\r\n\n   # comment only\nnode2 slots=2 # threads=4\nnode3"
    written = set_weights(text, [1.0, 2.345, 1.5], "lab.txt")
    assert written == ("# lab\r\nnode1:2 # weight=1.00 head here\r\n\n   # comment only\n"
                       "node2 slots=2 # weight=2.35 threads=4\nnode3  # weight=1.50")


def test_set_weights_of_a_shipped_hostfile_parses_back(tmp_path):
    source = REPO / "hosts" / "lab.txt"
    path = tmp_path / "lab.txt"
    path.write_text(set_weights(source.read_text(), [1.0, 2.0, 3.0, 4.25], str(source)))
    hosts = parse_hostfile(path)
    assert [h.weight for h in hosts] == [1.0, 2.0, 3.0, 4.25]
    assert ([(h.name, h.slots, h.threads) for h in hosts]
            == [(h.name, h.slots, h.threads) for h in parse_hostfile(source)])
    kept = [line for line in source.read_text().splitlines() if line.lstrip().startswith("#")]
    assert kept == [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")]


@pytest.mark.parametrize("weights, fragment", [([1.0], "1 weights for 2 hosts"),
                                               ([1.0, 2.0, 3.0], "3 weights for 2 hosts")])
def test_set_weights_wants_one_weight_per_host(weights, fragment):
    with pytest.raises(HostfileError, match=fragment):
        set_weights("a\n# b\nc\n", weights, "f")


def test_set_weights_refuses_a_bad_hostfile_line():
    with pytest.raises(HostfileError, match="f:2"):
        set_weights("a\nb slot=2\n", [1.0, 1.0], "f")


def test_link_lines_name_host_pairs(tmp_path):
    from pipeinfer_cpu.app.hostfile import link_map, parse_links
    from pipeinfer_cpu.wire.links import HostLink, LinkSpec

    path = tmp_path / "hosts.txt"
    path.write_text("a:2\nb\n# link a b bw=1gbit,delay=0.5ms\n#link b b delay=20us  \n# a comment\n")
    assert [h.name for h in parse_hostfile(path)] == ["a", "b"]  # link lines are comments to the host parser
    assert parse_links(path) == (HostLink("a", "b", LinkSpec(1e9, 0.0005)), HostLink("b", "b", LinkSpec(None, 20e-6)))
    links = link_map("bw=100mbit,delay=2ms", path, ("a", "a", "b"))
    assert links.spec(0, 1) == LinkSpec(1e8, 0.002) and links.spec(1, 2) == LinkSpec(1e9, 0.0005)
    assert link_map(None, None, ("a", "b")) is None
    assert [h.name for h in parse_hostfile(REPO / "hosts" / "lab.txt")] == ["node1", "node2", "node3", "node4"]
    assert len(parse_links(REPO / "hosts" / "lab.txt")) == 2  # the documented example lines parse


@pytest.mark.parametrize("line, fragment", [
    ("# link a c bw=1gbit", "hosts.txt:3: link names host 'c', which no line of the hostfile lists"),
    ("# link a b", "hosts.txt:3: expected '# link HOST_A HOST_B bw=RATE,delay=TIME'"),
    ("# link a b bw=0gbit", "hosts.txt:3: bad link setting 'bw=0gbit': bw must be above 0"),
    ("# link b a bw=1gbit\n# link a b delay=1ms", "hosts.txt:4: link a b is already set on line 3"),
])
def test_bad_link_lines_name_file_and_line(tmp_path, line, fragment):
    from pipeinfer_cpu.app.hostfile import parse_links

    path = tmp_path / "hosts.txt"
    path.write_text(f"a\nb\n{line}\n")
    with pytest.raises(HostfileError) as caught:
        parse_links(path)
    assert fragment in str(caught.value)
