"""The library's messages name parameters (`overwrite=True`), the command line's name flags (`--overwrite`):
`jaxcascade.commands.flags.to_flags` and its one table, and one mistake made through both."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from jaxcascade.commands.flags import FLAGS, to_flags
from jaxcascade.errors import UserError

PARAMETERS = st.sampled_from(sorted(FLAGS))
# Text around a form: anything that neither ends in a word character, '.' or '-' nor starts with a word character.
BEFORE = st.text(max_size=20).filter(lambda text: not text or not (text[-1].isalnum() or text[-1] in "_.-"))
AFTER = st.text(max_size=20).filter(lambda text: not text or not (text[0].isalnum() or text[0] == "_"))


def test_every_flag_of_the_table_is_one_of_the_command_lines():
    from jaxcascade import cli

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    options = {option for command in commands.values() for option in command._option_string_actions}
    assert sorted(set(FLAGS.values()) - options) == []


@given(PARAMETERS, st.text(max_size=30), st.lists(st.text(max_size=10), min_size=1, max_size=3))
def test_each_parameter_form_becomes_its_flag_as_a_shell_reads_it(parameter, value, values):
    flag = FLAGS[parameter]
    assert to_flags(f"{parameter}=True") == to_flags(f"{parameter}=...") == flag
    assert shlex.split(to_flags(f"{parameter}={value!r}")) == [flag, value]
    assert shlex.split(to_flags(f"{parameter}={values!r}")) == [word for item in values for word in (flag, item)]
    assert shlex.split(to_flags(f"{parameter}={tuple(values)!r}")) == [flag, ",".join(values)]
    assert shlex.split(to_flags(f"{parameter}={dict.fromkeys(values, 'v')!r}")) == [
        word for item in dict.fromkeys(values) for word in (flag, f"{item}=v")]


@given(BEFORE, PARAMETERS, st.from_regex(r"[A-Za-z0-9_./:-]{1,12}", fullmatch=True), AFTER)
def test_a_form_inside_a_message_is_replaced_and_nothing_else(before, parameter, value, after):
    assert to_flags(f"{before}{parameter}={value!r}{after}") == f"{before}{FLAGS[parameter]} {value}{after}"


@given(st.text(), PARAMETERS, st.text(max_size=10))
def test_text_without_parameter_forms_is_left_as_it_is(text, parameter, value):
    if not any(f"{name}=" in text for name in FLAGS):
        assert to_flags(text) == text
    # Config overrides are the API's strings too, and a parameter's name inside a longer one is another name.
    for kept in (f"--config.train.{parameter}={value!r}", f"x{parameter}={value!r}", f"{parameter}=False",
                 f"{parameter}=None", f"{parameter}=PosixPath('x')"):
        assert to_flags(kept) == kept


def test_an_api_error_names_the_parameter_and_the_same_mistake_on_the_command_line_the_flag(tmp_path):
    """A change run into a folder that holds an earlier run's outputs is refused before any work, by both."""
    from jaxcascade import api

    out = tmp_path / "change"
    out.mkdir()
    (out / "summary.csv").write_text("an earlier run's\n")
    visit = {"FLAIR": str(tmp_path / "flair.nii.gz")}
    with pytest.raises(UserError) as raised:
        api.detect_changes(None, visit, visit, out_dir=out)
    earlier = f"{out}: holds summary.csv (and 0 more outputs) of an earlier run"
    assert str(raised.value) == f"{earlier}; pass overwrite=True or choose another out_dir=..."
    command = subprocess.run([sys.executable, "-m", "jaxcascade.cli", "change", "--baseline", f"FLAIR={visit['FLAIR']}",
                              "--followup", f"FLAIR={visit['FLAIR']}", "--out-dir", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert command.returncode == 2, command.stderr
    assert command.stderr == f"jaxcascade: error: {earlier}; pass --overwrite or choose another --out-dir\n"
    assert (out / "summary.csv").read_text() == "an earlier run's\n"
