import os, pytest
from pathlib import Path
from flashdino.outputs import OutputPathError, _umask, atomic_write, check_output_path
def test_refuses_existing_and_input(tmp_path):
    f = tmp_path / "a.safetensors"; f.write_bytes(b"x")
    with pytest.raises(OutputPathError, match="already exists"):
        check_output_path(f)
    with pytest.raises(OutputPathError, match="also an input"):
        check_output_path(f, overwrite=True, inputs=[f])
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_path(tmp_path)
    assert check_output_path(f, overwrite=True) == f
def test_atomic(tmp_path):
    f = tmp_path / "sub" / "o.bin"
    with atomic_write(f) as t:
        t.write_bytes(b"new")
    assert f.read_bytes() == b"new"
    assert f.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's private 0600
    f.chmod(0o640)
    with atomic_write(f) as t:
        t.write_bytes(b"new")
    assert f.stat().st_mode & 0o777 == 0o640  # an overwrite keeps the file's mode
    link = tmp_path / "link.bin"; link.symlink_to(f)
    with atomic_write(link) as t:
        t.write_bytes(b"newer")
    assert link.is_symlink() and f.read_bytes() == b"newer"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(f) as t:
            t.write_bytes(b"half"); raise KeyboardInterrupt
    assert f.read_bytes() == b"newer"
    assert sorted(p.name for p in f.parent.iterdir()) == ["o.bin"]
def test_unwritable(tmp_path):
    d = tmp_path / "ro"; d.mkdir(); d.chmod(0o500)
    if os.access(d, os.W_OK): pytest.skip("root ignores permissions")
    with pytest.raises(OutputPathError, match="no write permission"):
        check_output_path(d / "x" / "y.bin")


def test_no_clobber_publish_refuses_a_file_that_appeared_meanwhile(tmp_path):
    """Two runs racing to one new output: the second does not silently replace the first's file."""
    f = tmp_path / "out.safetensors"
    with pytest.raises(OutputPathError, match="appeared while this run was writing"):
        with atomic_write(f, overwrite=False) as t:
            t.write_bytes(b"mine")
            f.write_bytes(b"the other run's")  # the other run published first
    assert f.read_bytes() == b"the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left
    g = tmp_path / "new.bin"
    with atomic_write(g, overwrite=False) as t:
        t.write_bytes(b"ok")
    assert g.read_bytes() == b"ok" and sorted(p.name for p in tmp_path.iterdir()) == ["new.bin", "out.safetensors"]
