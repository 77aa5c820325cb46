import pytest

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.modelfiles.planning import LayerRange, parse_weights, split_layers


@pytest.mark.parametrize("n_layer, weights, sizes", [
    (30, [1, 1], [15, 15]),
    (30, [1, 1, 1], [10, 10, 10]),
    (30, [1, 1, 1, 1], [8, 8, 7, 7]),
    (30, [2, 1], [20, 10]),
    (30, [1.5, 1, 1, 0.5], [11, 8, 7, 4]),
    (5, [100, 1, 1], [3, 1, 1]),  # every stage keeps at least one layer
    (4, [1, 1, 1, 1], [1, 1, 1, 1]),
    (120, [1], [120]),
])
def test_split_sizes(n_layer, weights, sizes):
    ranges = split_layers(n_layer, weights)
    assert [r.size for r in ranges] == sizes


@pytest.mark.parametrize("n_layer, n_stages", [(30, 1), (30, 2), (30, 7), (31, 4), (120, 5)])
def test_ranges_cover_every_layer_once_in_order(n_layer, n_stages):
    ranges = split_layers(n_layer, [1.0] * n_stages)
    covered = [layer for r in ranges for layer in range(r.start, r.end)]
    assert covered == list(range(n_layer))
    assert ranges[0].is_first and ranges[-1].is_last
    assert not any(r.is_last for r in ranges[:-1])


def test_more_stages_than_layers_is_a_user_error():
    with pytest.raises(UserError, match="cannot split 30 layers into 31 stages"):
        split_layers(30, [1.0] * 31)


@pytest.mark.parametrize("weights", [[1, 0], [1, -2], [float("nan"), 1], []])
def test_bad_weights(weights):
    with pytest.raises(UserError):
        split_layers(30, weights)


def test_parse_weights():
    assert parse_weights(None, 3) == (1.0, 1.0, 1.0)
    assert parse_weights("2,1", 2) == (2.0, 1.0)
    with pytest.raises(UserError, match="3 values for 2 stages"):
        parse_weights("1,1,1", 2)
    with pytest.raises(UserError, match="comma-separated"):
        parse_weights("1;2", 2)


def test_layer_range_validates():
    with pytest.raises(ValueError):
        LayerRange(5, 5, 10)
    assert str(LayerRange(0, 15, 30)) == "[0, 15)"
