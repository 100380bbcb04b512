"""The Slicer extension's CMake lists install every Python file of the module and of SegQCLib.

Slicer only ships what the CMake lists name (no globs), so a new ``.py`` file that is not added to
``SegQC/CMakeLists.txt`` or ``SegQCLib/CMakeLists.txt`` works from the source tree and fails with an
ImportError in an installed extension. Two checks:

- ``test_*_listed``: a small interpreter of the CMake subset these lists use (``set``, ``list(APPEND)``,
  ``${VAR}``, ``add_subdirectory``, ``slicerMacroBuildScriptedModule``, ``ctkMacroCompilePythonScript``,
  ``install(DIRECTORY)``) maps every listed file to its place in the installed
  ``qt-scripted-modules`` folder, and compares with the files on disk.
- ``test_configure_and_install_with_stub_slicer``: runs the real ``cmake`` on the lists against a
  stub Slicer (the CTK/Slicer macros reduced to copy + install), installs, and imports ``SegQC`` and
  ``SegQCLib`` from the install tree in a fresh interpreter.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("SegQC", "SegQCLib", "SegQCLogic")
QT_SCRIPTED = "<Slicer_QTSCRIPTEDMODULES_LIB_DIR>"
QT_SCRIPTED_INSTALL = "<Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR>"
BINARY_DIR = "<CMAKE_BINARY_DIR>"


# --------------------------------------------------------------------------- a tiny CMake reader
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[\[.*?\]\]|[^\s()"#]+|[()]|#[^\n]*', re.S)


def parse_commands(text: str) -> list[tuple[str, list[tuple[str, bool]]]]:
    """``[(command name lower-case, [(argument, quoted), ...]), ...]`` of a CMake file."""
    tokens = [t for t in _TOKEN.findall(text) if not t.startswith("#")]
    commands, i = [], 0
    while i < len(tokens):
        name = tokens[i]
        if i + 1 >= len(tokens) or tokens[i + 1] != "(" or not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"cannot parse CMake near {' '.join(tokens[i:i + 5])!r}")
        i += 2
        depth, args = 1, []
        while True:
            tok = tokens[i]
            i += 1
            if tok == "(":
                depth += 1
            elif tok == ")":
                depth -= 1
                if depth == 0:
                    break
            else:
                quoted = tok.startswith('"')
                args.append((tok[1:-1] if quoted else tok, quoted))
        commands.append((name.lower(), args))
    return commands


def _expand(value: str, variables: dict[str, str]) -> str:
    pattern = re.compile(r"\$\{(\w+)\}")
    while (match := pattern.search(value)) is not None:
        name = match.group(1)
        value = value[: match.start()] + variables.get(name, f"<{name}>") + value[match.end():]
    return value


def _values(args: list[tuple[str, bool]], variables: dict[str, str]) -> list[str]:
    """Expanded arguments, as the commands we read see them.

    An unquoted argument is split on ``;`` (empty items dropped); a quoted one is a single argument,
    but every command read here parses its arguments as a list (``cmake_parse_arguments`` of a
    macro's ARGN, ``set`` of a list), so a quoted ``"${LIST}"`` is split there too.
    """
    out = []
    for raw, _quoted in args:
        out.extend(v for v in _expand(raw, variables).split(";") if v)
    return out


def _keyword_args(values: list[str], one: set[str], multi: set[str], options: set[str]) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    current = None
    for value in values:
        if value in one | multi | options:
            current = value
            parsed.setdefault(value, [])
            if value in options:
                current = None
        elif current is not None:
            parsed[current].append(value)
            if current in one:
                current = None
    return parsed


@dataclass
class Installed:
    """What the lists install: {source file: path under the installed qt-scripted-modules folder}."""

    files: dict[Path, str] = field(default_factory=dict)
    directories: list[tuple[Path, str]] = field(default_factory=list)  # install(DIRECTORY src DESTINATION dst)
    tests: set[Path] = field(default_factory=set)
    variables: dict[str, str] = field(default_factory=dict)  # top-level variables
    subdirectories: list[str] = field(default_factory=list)


def _install_compiled(installed: Installed, source_dir: Path, scripts: list[str], resources: list[str],
                      destination_dir: str, install_dir: str, no_install_subdir: bool) -> None:
    """ctkMacroCompilePythonScript: copy to DESTINATION_DIR/<relative path>; install that folder."""
    prefix = f"{BINARY_DIR}/{QT_SCRIPTED}"
    assert destination_dir == prefix or destination_dir.startswith(prefix + "/"), (
        f"DESTINATION_DIR {destination_dir} is not under {prefix}")
    assert install_dir == QT_SCRIPTED_INSTALL, f"INSTALL_DIR {install_dir} is not {QT_SCRIPTED_INSTALL}"
    subdir = destination_dir[len(prefix):].strip("/")
    # install(DIRECTORY dest) puts the folder itself under INSTALL_DIR; with "dest/" only its content
    installed_subdir = "" if no_install_subdir else subdir
    if no_install_subdir:
        assert not subdir, "NO_INSTALL_SUBDIR with a sub-folder DESTINATION_DIR drops the sub-folder at install"
    for name in scripts:
        if not name.endswith(".py"):
            name += ".py"
        installed.files[(source_dir / name).resolve()] = "/".join(p for p in (installed_subdir, name) if p)
    for name in resources:
        installed.files[(source_dir / name).resolve()] = "/".join(p for p in (installed_subdir, name) if p)


def read_lists(directory: Path = ROOT, variables: dict[str, str] | None = None,
               installed: Installed | None = None) -> Installed:
    """Interpret ``directory/CMakeLists.txt`` and the sub-directories it adds."""
    installed = installed if installed is not None else Installed()
    top = variables is None
    variables = dict(variables or {})
    variables["CMAKE_CURRENT_SOURCE_DIR"] = str(directory)
    if top:
        variables["CMAKE_SOURCE_DIR"] = str(directory)
    for command, args in parse_commands((directory / "CMakeLists.txt").read_text()):
        values = _values(args, variables)
        if command == "set":
            name, rest = values[0], [v for v in values[1:] if v not in ("PARENT_SCOPE",)]
            variables[name] = ";".join(rest)
        elif command == "list" and values[0] == "APPEND":
            variables[values[1]] = ";".join([v for v in variables.get(values[1], "").split(";") if v] + values[2:])
        elif command == "add_subdirectory":
            if top:
                installed.subdirectories.append(values[0])
            read_lists((directory / values[0]).resolve(), variables, installed)
        elif command == "slicermacrobuildscriptedmodule":
            kw = _keyword_args(values, {"NAME"}, {"SCRIPTS", "RESOURCES"}, {"WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"})
            subdir = f"/{directory.name}" if "WITH_SUBDIR" in kw else ""
            _install_compiled(installed, directory, kw.get("SCRIPTS", []), kw.get("RESOURCES", []),
                              f"{BINARY_DIR}/{QT_SCRIPTED}{subdir}", QT_SCRIPTED_INSTALL, not subdir)
        elif command == "ctkmacrocompilepythonscript":
            kw = _keyword_args(values, {"TARGET_NAME", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR"},
                               {"SCRIPTS", "RESOURCES"}, {"NO_INSTALL_SUBDIR", "GLOBAL_TARGET"})
            source_dir = Path(kw["SOURCE_DIR"][0]) if kw.get("SOURCE_DIR") else directory
            _install_compiled(installed, source_dir, kw.get("SCRIPTS", []), kw.get("RESOURCES", []),
                              kw["DESTINATION_DIR"][0].rstrip("/"), kw["INSTALL_DIR"][0], "NO_INSTALL_SUBDIR" in kw)
        elif command == "install" and values and values[0] == "DIRECTORY":
            kw = _keyword_args(values, {"DESTINATION", "COMPONENT"}, {"DIRECTORY"}, {"USE_SOURCE_PERMISSIONS"})
            for source in kw["DIRECTORY"]:
                installed.directories.append((Path(source).resolve(), kw["DESTINATION"][0]))
        elif command == "slicer_add_python_unittest":
            kw = _keyword_args(values, {"SCRIPT", "SLICER_ARGS", "TESTNAME_PREFIX"}, set(), set())
            installed.tests.add((directory / kw["SCRIPT"][0]).resolve())
    if top:
        installed.variables = variables
    return installed


def python_files_on_disk() -> list[Path]:
    return sorted(
        path.resolve()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    )


@pytest.fixture(scope="module")
def installed() -> Installed:
    return read_lists()


# --------------------------------------------------------------------------- checks on the lists
def test_reader_understands_cmake_syntax():
    commands = parse_commands(textwrap.dedent("""
        set(A x.py  # a comment
          "sub dir/y.py" ${B})
        foo(NAME ${A} ")" (nested args))
    """))
    assert commands[0] == ("set", [("A", False), ("x.py", False), ("sub dir/y.py", True), ("${B}", False)])
    assert commands[1][0] == "foo" and (")", True) in commands[1][1]
    assert _values([("${A}", False), ("${A}", True), ("${NONE}", False)], {"A": "p.py;q.py", "NONE": ""}) == [
        "p.py", "q.py", "p.py", "q.py"]


def test_every_python_file_is_listed(installed):
    missing = [str(p.relative_to(ROOT)) for p in python_files_on_disk()
               if p not in installed.files and p not in installed.tests]
    assert not missing, (
        "Python files not installed by the CMake lists (add them to SegQC/CMakeLists.txt or "
        f"SegQCLib/CMakeLists.txt): {missing}")


def test_every_listed_file_exists(installed):
    absent = [str(p) for p in [*installed.files, *installed.tests] if not p.is_file()]
    assert not absent, f"the CMake lists name files that do not exist: {absent}"


def test_install_layout_mirrors_source_tree(installed):
    """Installed paths keep the package structure: ``SegQC.py`` beside ``SegQCLib/...``."""
    for source, target in installed.files.items():
        relative = source.relative_to(ROOT)
        if relative.parts[0] in ("SegQCLib", "SegQCLogic"):
            assert target == relative.as_posix(), f"{relative} installed as {target}"
        elif relative.parts[0] == "SegQC":
            assert target == Path(*relative.parts[1:]).as_posix(), f"{relative} installed as {target}"
        else:
            pytest.fail(f"unexpected installed file {relative}")
    assert installed.files[(ROOT / "SegQC" / "SegQC.py").resolve()] == "SegQC.py"
    assert installed.files[(ROOT / "SegQCLib" / "__init__.py").resolve()] == "SegQCLib/__init__.py"


def test_module_resources_are_installed(installed):
    for resource in ("Resources/UI/SegQC.ui", "Resources/Icons/SegQC.png"):
        assert installed.files.get((ROOT / "SegQC" / resource).resolve()) == resource


def test_models_installed_beside_the_library(installed):
    """Weights land at ``<qt-scripted-modules>/Resources/Models``, i.e. ``SegQCLib/../Resources/Models``."""
    models = (ROOT / "Resources" / "Models").resolve()
    assert (models, f"{QT_SCRIPTED_INSTALL}/Resources") in installed.directories


def test_extension_metadata(installed):
    v = installed.variables
    assert v["EXTENSION_CATEGORY"] == "Quality Control"
    assert "PyTorch" in v["EXTENSION_DEPENDS"].split(";")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert v.get(key), f"{key} is empty"
    assert "SEGQC_REPOSITORY_URL" in v and v["EXTENSION_ICONURL"].endswith("SegQC/Resources/Icons/SegQC.png")
    assert installed.subdirectories[:1] == ["SegQC"]


def test_reader_flags_an_unlisted_file(tmp_path):
    """The reader is not a glob: a file on disk but not in the list is not installed."""
    (tmp_path / "CMakeLists.txt").write_text(textwrap.dedent("""
        set(S a.py)
        list(APPEND S sub/b.py)
        ctkMacroCompilePythonScript(TARGET_NAME X SCRIPTS "${S}"
          DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/X
          INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR})
    """))
    for name in ("a.py", "sub/b.py", "sub/c.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    result = read_lists(tmp_path)
    assert result.files == {(tmp_path / "a.py").resolve(): "X/a.py", (tmp_path / "sub/b.py").resolve(): "X/sub/b.py"}


# --------------------------------------------------------------------------- real cmake, stub Slicer
_STUB_SLICER_CONFIG = r"""
# Stub of an installed Slicer for configure-and-install tests: only what an extension's lists call.
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
"""

_STUB_USE_SLICER = r"""
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.13/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(Slicer_USE_PYTHONQT ON)
foreach(var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION
            EXTENSION_ICONURL EXTENSION_DEPENDS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "${var} is not set before include(Slicer_USE_FILE)")
  endif()
endforeach()

# CTK's macro, reduced: copy each file to DESTINATION_DIR/<its relative path> at configure time
# (CTK copies at build time), then install the DESTINATION_DIR folder the way CTK does.
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
    "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(varname TARGET_NAME SCRIPTS DESTINATION_DIR INSTALL_DIR)
    if(NOT DEFINED MY_${varname})
      message(FATAL_ERROR "${varname} is mandatory")
    endif()
  endforeach()
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "ctkMacroCompilePythonScript: unknown arguments ${MY_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT DEFINED MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  foreach(file ${MY_SCRIPTS})
    get_filename_component(file_ext ${file} EXT)
    if(NOT "${file_ext}" MATCHES "py")
      set(file "${file}.py")
    endif()
    if(NOT EXISTS "${MY_SOURCE_DIR}/${file}")
      message(FATAL_ERROR "ctkMacroCompilePythonScript: no such script ${MY_SOURCE_DIR}/${file}")
    endif()
    configure_file("${MY_SOURCE_DIR}/${file}" "${MY_DESTINATION_DIR}/${file}" COPYONLY)
  endforeach()
  foreach(file ${MY_RESOURCES})
    if(NOT EXISTS "${MY_SOURCE_DIR}/${file}")
      message(FATAL_ERROR "ctkMacroCompilePythonScript: no such resource ${MY_SOURCE_DIR}/${file}")
    endif()
    configure_file("${MY_SOURCE_DIR}/${file}" "${MY_DESTINATION_DIR}/${file}" COPYONLY)
  endforeach()
  set(MY_DIRECTORY_TO_INSTALL ${MY_DESTINATION_DIR})
  if(MY_NO_INSTALL_SUBDIR)
    set(MY_DIRECTORY_TO_INSTALL ${MY_DESTINATION_DIR}/)
  endif()
  install(DIRECTORY "${MY_DIRECTORY_TO_INSTALL}" DESTINATION "${MY_INSTALL_DIR}"
    COMPONENT RuntimeLibraries USE_SOURCE_PERMISSIONS)
endmacro()

# Slicer's macro, reduced to its argument checks and its ctkMacroCompilePythonScript call.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT DEFINED MY_SLICER_NAME)
    message(FATAL_ERROR "NAME is mandatory")
  endif()
  set(_no_install_subdir_option NO_INSTALL_SUBDIR)
  set(_destination_subdir "")
  if(MY_SLICER_WITH_SUBDIR)
    get_filename_component(_destination_subdir ${CMAKE_CURRENT_SOURCE_DIR} NAME)
    set(_destination_subdir "/${_destination_subdir}")
    set(_no_install_subdir_option "")
  endif()
  ctkMacroCompilePythonScript(
    TARGET_NAME ${MY_SLICER_NAME}
    SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}${_destination_subdir}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}
    ${_no_install_subdir_option}
    )
endmacro()

macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT}")
    message(FATAL_ERROR "slicer_add_python_unittest: no such script ${MY_SCRIPT}")
  endif()
endmacro()
"""


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="needs cmake and a C++ compiler (project() enables C and CXX)")
def test_configure_and_install_with_stub_slicer(tmp_path):
    stub = tmp_path / "Slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(_STUB_SLICER_CONFIG)
    (stub / "UseSlicer.cmake").write_text(_STUB_USE_SLICER)
    (stub / "Empty.cmake").write_text("")
    build, prefix = tmp_path / "build", tmp_path / "install"

    def run(*args: str) -> None:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    run("cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=ON")
    run("cmake", "--install", str(build), "--prefix", str(prefix))

    modules = prefix / "lib/Slicer-5.13/qt-scripted-modules"
    for source in python_files_on_disk():
        relative = source.relative_to(ROOT)
        expected = modules / (Path(*relative.parts[1:]) if relative.parts[0] == "SegQC" else relative)
        assert expected.is_file(), f"{relative} is not installed as {expected.relative_to(prefix)}"
    assert (modules / "Resources/UI/SegQC.ui").is_file()
    assert (modules / "Resources/Icons/SegQC.png").is_file()
    models = ROOT / "Resources" / "Models"
    for source in (p for p in models.rglob("*") if p.is_file()) if models.is_dir() else ():
        assert (modules / "Resources/Models" / source.relative_to(models)).is_file(), f"{source} not installed"

    # the installed tree alone imports: SegQCLib from beside the module, and the Logic headless
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        modules, has_models = Path(sys.argv[1]), sys.argv[2] == "1"
        sys.path.insert(0, str(modules))
        import SegQCLib, SegQCLogic, SegQC
        assert Path(SegQCLib.__file__).parent.parent == modules, SegQCLib.__file__
        assert Path(SegQCLogic.__file__).parent.parent == modules, SegQCLogic.__file__
        assert (modules / "Resources" / "Models").is_dir() or not has_models
        SegQC.SegQCLogic()
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(modules), "1" if models.is_dir() else "0"],
                          cwd=modules, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
