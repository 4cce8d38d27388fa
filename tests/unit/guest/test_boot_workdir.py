"""The config file a boot hands to the server: the config's own file, or -- when the text
was edited after reading it -- a copy of the edited text in the run's folder."""

from __future__ import annotations

from viommu_backend.config import default_config_text, loads_config
from viommu_backend.guest.boot import BootSummary, _prepare_workdir


def test_unedited_config_file_is_handed_over_as_is(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(default_config_text())
    config = loads_config(f.read_text(), str(f))
    assert _prepare_workdir(config, BootSummary(), tmp_path / "run") == f


def test_edited_text_of_a_config_file_is_what_the_server_gets(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(default_config_text())
    edited = f.read_text().replace('bar0_size = "128K"\n', 'bar0_size = "128K"\noptions = { sanitize = true }\n')
    config = loads_config(edited, str(f))
    handed = _prepare_workdir(config, BootSummary(), tmp_path / "run")
    assert handed == tmp_path / "run" / "config.toml" and handed.read_text() == edited
    assert f.read_text() != edited  # the user's file is untouched
