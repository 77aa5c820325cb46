"""Stop strings end an answer where they appear, and a stream never shows what the answer does not hold."""

from pipeinfer_cpu.head.stop_strings import StopStrings


def shown(stops, pieces):
    watcher = StopStrings(stops)
    text = "".join(watcher.push(piece) for piece in pieces)
    return text + ("" if watcher.matched else watcher.flush()), watcher.matched


def test_a_stop_string_inside_one_piece_ends_the_text_before_it():
    assert shown(["STOP"], ["hello STOP world"]) == ("hello ", "STOP")


def test_a_stop_string_split_across_pieces_is_found_and_never_shown():
    watcher = StopStrings(["</end>"])
    assert watcher.push("answer </") == "answer "  # "</" may begin the stop string: held
    assert watcher.push("en") == ""
    assert watcher.push("d> more") == ""
    assert watcher.matched == "</end>"


def test_held_text_that_is_no_stop_string_is_released():
    watcher = StopStrings(["\nUser:"])
    assert watcher.push("a\nUs") == "a"
    assert watcher.push("ually") == "\nUsually"
    assert watcher.push("\n") == ""
    assert watcher.flush() == "\n"
    assert watcher.matched is None


def test_the_earliest_of_several_stop_strings_wins():
    assert shown(["world", "lo"], ["hello world"]) == ("hel", "lo")


def test_nothing_is_shown_after_a_match():
    watcher = StopStrings(["x"])
    assert watcher.push("ax") == "a"
    assert watcher.push("more") == ""
    assert watcher.flush() == ""


def test_no_stop_strings_pass_everything_through():
    assert shown([], ["a", "b"]) == ("ab", None)
    assert shown([""], ["a"]) == ("a", None)  # an empty stop string would match everywhere: ignored
