#!/usr/bin/env python3
"""Regenerate slime_flags.txt: every command-line flag that slime's train.py /
train_async.py accept.  Standard library only (plus the `git` command line to
read the bare mirrors and to apply slime's docker patches).

slime parses sys.argv with four argparse parsers, all of them tolerant of
unknown options (parse_known_args), so the accepted set is their union:

  1. slime/utils/arguments.py::_pre_parse_mode          (allow_abbrev=False)
  2. slime/backends/sglang_utils/arguments.py::sglang_parse_args
       - temp parser (3 flags)                          (allow_abbrev=True!)
       - main parser: slime's own sglang-side flags, sglang_router RouterArgs
         (use_router_prefix=True, exclude_host_port=True) and sglang ServerArgs
         re-registered with a `--sglang-` prefix minus `skipped_args`
                                                         (allow_abbrev=True!)
  3. megatron.training.arguments.parse_args(extra_args_provider=slime's
     add_slime_arguments, ignore_unknown_args=True)     (allow_abbrev=False)
       - literal add_argument() calls in the functions reachable from
         add_megatron_arguments(), with slime's docker/patch/<ver>/megatron*.patch
         applied
       - ArgumentGroupFactory(<dataclass>, exclude=...) groups: one flag per
         dataclass field (bases included, init=False excluded); bool fields
         whose default is not False get `--no-X` and `--disable-X` instead of
         `--X`; metadata["argparse_meta"]["arg_names"] overrides the names
       - slime's add_argument()/reset_arg() calls, plus argparse's --help/-h

No code from those projects is imported or run: everything is read with `ast`.

Usage (defaults match the mirrors used when the list was made):
  python3 tools/make_slime_flags.py \
      --slime-git /work/.mirror/THUDM+slime/repo --slime-rev HEAD \
      --megatron-git /work/.mirror/NVIDIA+Megatron-LM/repo \
      --sglang-wheel sglang-0.5.15.post1-*.whl \
      --router-wheel sglang_router-0.3.2-*.whl \
      -o slime_flags.txt
(get the wheels with `pip download --no-deps sglang==<ver> sglang-router==0.3.2`)
"""

import argparse
import ast
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WARNINGS = []


def warn(msg):
    WARNINGS.append(msg)
    print("WARNING:", msg, file=sys.stderr)


def git(gitdir, *args, binary=False):
    out = subprocess.run(["git", "-C", gitdir, *args], check=True, capture_output=True).stdout
    return out if binary else out.decode()


def str_const(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def flag_strings(call, fmt_env=None):
    """Option strings among the positional args of an add_argument call."""
    out = []
    for a in call.args:
        s = str_const(a)
        if s is None and isinstance(a, ast.JoinedStr) and fmt_env is not None:
            parts = []
            for v in a.values:
                if isinstance(v, ast.Constant):
                    parts.append(v.value)
                elif isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.value.id in fmt_env:
                    parts.append(fmt_env[v.value.id])
                else:
                    parts = None
                    break
            s = "".join(parts) if parts is not None else None
        if s is None:
            warn(f"non-literal flag name at line {call.lineno}: {ast.unparse(a)}")
            continue
        if s.startswith("-"):
            out.append(s)
    return out


def is_bool_optional(action_node):
    """action=argparse.BooleanOptionalAction also registers --no-<name> for every --<name>."""
    return action_node is not None and ast.unparse(action_node).split(".")[-1] == "BooleanOptionalAction"


def with_negations(flags, action_node):
    flags = list(flags)
    if is_bool_optional(action_node):
        flags += ["--no-" + f[2:] for f in flags if f.startswith("--")]
    return flags


def call_flags(call, fmt_env=None):
    """flag_strings() plus the --no- forms argparse adds for BooleanOptionalAction."""
    action = next((kw.value for kw in call.keywords if kw.arg == "action"), None)
    return with_negations(flag_strings(call, fmt_env), action)


def is_add_argument(node):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"


# --------------------------------------------------------------------------- Megatron


class PyTree:
    """Python source tree on disk, with a class index for resolving names."""

    def __init__(self, root):
        self.root = root
        self._asts = {}

    def module_file(self, modname):
        base = os.path.join(self.root, *modname.split("."))
        for cand in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.exists(cand):
                return cand
        return None

    def parse(self, path):
        if path not in self._asts:
            with open(path) as f:
                self._asts[path] = ast.parse(f.read())
        return self._asts[path]

    def find_class(self, name, path, _seen=None):
        """Find ClassDef `name` visible from module file `path` (defined there or imported)."""
        _seen = _seen or set()
        if (name, path) in _seen:
            return None
        _seen.add((name, path))
        tree = self.parse(path)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node, path
        pkg = os.path.relpath(os.path.dirname(path), self.root).replace(os.sep, ".")
        for node in ast.walk(tree):  # also function-local imports
            if isinstance(node, ast.ImportFrom):
                for al in node.names:
                    if (al.asname or al.name) != name:
                        continue
                    mod = node.module or ""
                    if node.level:
                        parts = pkg.split(".")
                        parts = parts[: len(parts) - (node.level - 1)]
                        mod = ".".join(parts + ([mod] if mod else []))
                    f = self.module_file(mod)
                    if f:
                        r = self.find_class(al.name, f, _seen)
                        if r:
                            return r
        return None


def dataclass_fields(tree, cls, path):
    """Ordered dict name -> AnnAssign over the class and its (dataclass) bases."""
    fields = {}
    for b in cls.bases:
        bname = ast.unparse(b).split(".")[-1]
        if bname in ("object", "Generic", "ABC"):
            continue
        r = tree.find_class(bname, path)
        if r is None:
            warn(f"base class {bname} of {cls.name} not found; its fields are missing")
            continue
        bcls, bpath = r
        if any("dataclass" in ast.unparse(d) for d in bcls.decorator_list):
            fields.update(dataclass_fields(tree, bcls, bpath))
    for s in cls.body:
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name):
            ann = ast.unparse(s.annotation)
            if ann.startswith(("ClassVar", "typing.ClassVar", "InitVar", "dataclasses.InitVar")):
                continue
            fields[s.target.id] = s
    return fields


def _literal(node, default="?"):
    try:
        return ast.literal_eval(node)
    except Exception:
        return default


def factory_flags(fieldname, ann_assign):
    """Emulate megatron.training.argument_utils.ArgumentGroupFactory for one field."""
    value = ann_assign.value
    default, init, meta_names = "?", True, None
    if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                default = _literal(kw.value)
            elif kw.arg == "default_factory":
                default = "<factory>"
            elif kw.arg == "init":
                init = _literal(kw.value, True)
            elif kw.arg == "metadata":
                md = kw.value
                if isinstance(md, ast.Dict):
                    for k, v in zip(md.keys, md.values, strict=True):
                        if k is not None and str_const(k) == "argparse_meta" and isinstance(v, ast.Dict):
                            for k2, v2 in zip(v.keys, v.values, strict=True):
                                if k2 is not None and str_const(k2) == "arg_names":
                                    meta_names = _literal(v2, None)
                                    if meta_names is None:
                                        warn(f"non-literal arg_names for field {fieldname}")
                else:
                    warn(f"non-literal metadata for field {fieldname}: {ast.unparse(md)[:60]}")
    elif value is not None:
        default = _literal(value)
    if init is False:
        return []
    if meta_names:
        return list(meta_names)
    ann = ast.unparse(ann_assign.annotation).replace(" ", "")
    is_bool = ann in ("bool", "Optional[bool]", "bool|None", "typing.Optional[bool]", "Union[bool,None]")
    base = "--" + fieldname.replace("_", "-")
    if not is_bool:
        return [base]
    if default == "?":  # default not statically known: accept every spelling
        warn(f"bool field {fieldname}: default not literal, emitting --X, --no-X and --disable-X")
        return [base, "--no-" + base[2:], "--disable-" + base[2:]]
    if default == False:  # noqa: E712  (mirrors `attribute.default == False`)
        return [base]
    return ["--no-" + base[2:], "--disable-" + base[2:]]


def megatron_flags(root):
    tree = PyTree(root)
    path = os.path.join(root, "megatron", "training", "arguments.py")
    mod = tree.parse(path)
    funcs = {n.name: n for n in mod.body if isinstance(n, ast.FunctionDef)}

    # functions reachable from add_megatron_arguments (+ parse_args for completeness)
    reach, todo = set(), ["add_megatron_arguments", "parse_args"]
    while todo:
        f = todo.pop()
        if f in reach or f not in funcs:
            continue
        reach.add(f)
        for n in ast.walk(funcs[f]):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in funcs:
                todo.append(n.func.id)

    flags = {"--help", "-h"}  # argparse.ArgumentParser(add_help=True) default
    for fname in sorted(reach):
        fn = funcs[fname]
        local_lists = {}
        for n in ast.walk(fn):
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                local_lists[n.targets[0].id] = n.value
        for n in ast.walk(fn):
            if is_add_argument(n):
                flags.update(call_flags(n))
            elif isinstance(n, ast.Call) and ast.unparse(n.func) == "ArgumentGroupFactory":
                cname = ast.unparse(n.args[0])
                exclude = []
                for kw in n.keywords:
                    if kw.arg == "exclude":
                        v = kw.value
                        if isinstance(v, ast.Name):
                            v = local_lists.get(v.id)
                        exclude = _literal(v, None) if v is not None else None
                        if exclude is None:
                            warn(f"could not resolve exclude= for {cname}; including all fields")
                            exclude = []
                r = tree.find_class(cname, path)
                if r is None:
                    warn(f"dataclass {cname} not found: its generated flags are MISSING")
                    continue
                cls, cpath = r
                for fld, node in dataclass_fields(tree, cls, cpath).items():
                    if fld in exclude:
                        continue
                    flags.update(factory_flags(fld, node))
    for fname, fn in funcs.items():
        if fname not in reach and any(is_add_argument(n) for n in ast.walk(fn)):
            warn(f"megatron {fname}() adds arguments but is not reachable from add_megatron_arguments; ignored")
    return flags


# --------------------------------------------------------------------------- slime


def slime_main_flags(src):
    """slime/utils/arguments.py: add_argument + reset_arg calls (pre-parser included)."""
    mod = ast.parse(src)
    flags = set()
    reset_lines = set()
    for n in ast.walk(mod):
        if isinstance(n, ast.FunctionDef) and n.name == "reset_arg":
            reset_lines = {m.lineno for m in ast.walk(n) if hasattr(m, "lineno")}
    for n in ast.walk(mod):
        if is_add_argument(n) and n.lineno not in reset_lines:
            flags.update(call_flags(n))
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "reset_arg":
            s = str_const(n.args[1]) if len(n.args) > 1 else None
            if s:
                flags.add(s)
    return flags


def slime_sglang_side(src):
    """slime/backends/sglang_utils/arguments.py: own flags and the ServerArgs skip list."""
    mod = ast.parse(src)
    flags, skipped = set(), None
    wrapper_lines = set()
    for n in ast.walk(mod):
        if isinstance(n, ast.FunctionDef) and n.name == "new_add_argument_wrapper":
            wrapper_lines = {m.lineno for m in ast.walk(n) if hasattr(m, "lineno")}
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "skipped_args" for t in n.targets):
            skipped = set(ast.literal_eval(n.value))
    for n in ast.walk(mod):
        if is_add_argument(n) and n.lineno not in wrapper_lines:
            flags.update(call_flags(n))
        # old_add_argument(...) inside the wrapper only re-adds ServerArgs flags
    if skipped is None:
        warn("skipped_args not found in sglang_utils/arguments.py")
        skipped = set()
    return flags, skipped


# --------------------------------------------------------------------------- sglang


def sglang_server_flags(src, skipped):
    """ServerArgs.add_cli_args, re-prefixed as slime's new_add_argument_wrapper does."""
    mod = ast.parse(src)
    cls = next(n for n in mod.body if isinstance(n, ast.ClassDef) and n.name == "ServerArgs")
    calls = []  # (names, dest or None)
    for s in cls.body:
        if not (isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)):
            continue
        ann = s.annotation
        if not (isinstance(ann, ast.Subscript) and ast.unparse(ann.value) in ("A", "Annotated", "typing.Annotated")):
            continue
        elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        meta = None
        for m in elts[1:]:
            if isinstance(m, ast.Call) and ast.unparse(m.func) == "Arg":
                meta = {kw.arg: kw.value for kw in m.keywords}
                break
            if str_const(m) is not None:
                meta = {}
                break
        if meta is None:
            continue
        if "no_cli" in meta and _literal(meta["no_cli"], False):
            continue
        field = s.target.id
        cli = str_const(meta["cli_name"]) if "cli_name" in meta else None
        if "cli_name" in meta and cli is None:
            warn(f"non-literal cli_name for ServerArgs.{field}")
        cli = cli or "--" + field.replace("_", "-")
        aliases = _literal(meta["aliases"], None) if "aliases" in meta else []
        if aliases is None:
            warn(f"non-literal aliases for ServerArgs.{field}")
            aliases = []
        auto_dest = cli.lstrip("-").replace("-", "_")
        calls.append(([cli] + list(aliases), field if field != auto_dest else None, meta.get("action")))
    add_cli = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "add_cli_args")
    for n in ast.walk(add_cli):
        if is_add_argument(n):
            dest = None
            for kw in n.keywords:
                if kw.arg == "dest":
                    dest = str_const(kw.value)
            action = next((kw.value for kw in n.keywords if kw.arg == "action"), None)
            calls.append((flag_strings(n), dest, action))
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "add_cli_args_from_dataclass":
            if ast.unparse(n.args[1]) != "ServerArgs" or n.keywords:
                warn(f"unhandled add_cli_args_from_dataclass call: {ast.unparse(n)}")
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("add_cli_args", "add_argument_group"):
            warn(f"unhandled call in ServerArgs.add_cli_args: {ast.unparse(n)[:80]}")
    flags = set()
    for names, dest, action in calls:
        # slime's wrapper: skip by dest, else by first long flag
        canon = dest
        if canon is None:
            for f in names:
                if f.startswith("--"):
                    canon = f[2:].replace("-", "_")
                    break
        if canon in skipped:
            continue
        # prefixing happens before argparse sees the names, so BooleanOptionalAction
        # yields --no-sglang-X (not --sglang-no-X)
        flags.update(with_negations(["--sglang-" + f.lstrip("-") for f in names if f.startswith("-")], action))
    return flags


def router_flags(src, use_router_prefix=True, exclude_host_port=True):
    """sglang_router RouterArgs.add_cli_args(parser, use_router_prefix, exclude_host_port)."""
    mod = ast.parse(src)
    cls = next(n for n in ast.walk(mod) if isinstance(n, ast.ClassDef) and n.name == "RouterArgs")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "add_cli_args")
    env = {"prefix": "router-" if use_router_prefix else "", "use_router_prefix": use_router_prefix,
           "exclude_host_port": exclude_host_port}
    flags = set()

    def cond(test):
        try:
            return bool(eval(compile(ast.Expression(test), "<cond>", "eval"), {}, dict(env)))
        except Exception:
            warn(f"router: cannot evaluate condition {ast.unparse(test)}; taking both branches")
            return None

    def visit(stmts):
        for st in stmts:
            if isinstance(st, ast.If):
                c = cond(st.test)
                if c in (True, None):
                    visit(st.body)
                if c in (False, None):
                    visit(st.orelse)
                continue
            for n in ast.walk(st):
                if is_add_argument(n):
                    flags.update(call_flags(n, fmt_env={"prefix": env["prefix"]}))

    visit(fn.body)
    return flags


# --------------------------------------------------------------------------- main


def read_from_wheel_or_dir(src, relpath):
    if os.path.isdir(src):
        with open(os.path.join(src, relpath)) as f:
            return f.read()
    with zipfile.ZipFile(src) as z:
        return z.read(relpath).decode()


def dist_version(src):
    """Version from a wheel's file name (a/b/name-VERSION-...whl), else '?'."""
    m = re.match(r"[^-]+-([^-]+)-", os.path.basename(src.rstrip("/")))
    return m.group(1) if m and src.endswith(".whl") else "?"


def apply_patches(tmpdir, relpath, text, patches, strip):
    """Write `text` to tmpdir/relpath and apply the hunks of `patches` touching it."""
    target = os.path.join(tmpdir, relpath)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
        f.write(text)
    for name, body in patches:
        pfile = os.path.join(tmpdir, os.path.basename(name))
        with open(pfile, "wb") as f:
            f.write(body)
        args = ["git", "apply", f"-p{strip}", f"--include={relpath}", pfile]
        r = subprocess.run(args, cwd=tmpdir, capture_output=True)
        if r.returncode:
            warn(f"patch {name} did not apply to {relpath}: {r.stderr.decode().strip()}")
    with open(target) as f:
        return f.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slime-git", default="/work/.mirror/THUDM+slime/repo")
    ap.add_argument("--slime-rev", default="HEAD")
    ap.add_argument("--megatron-git", default="/work/.mirror/NVIDIA+Megatron-LM/repo")
    ap.add_argument("--megatron-rev", default=None, help="default: MEGATRON_COMMIT in slime's docker/Dockerfile")
    ap.add_argument("--patch-version", default=None, help="docker/patch/<ver>; default: PATCH_VERSION in the Dockerfile")
    ap.add_argument("--sglang-wheel", required=True, help="sglang wheel (or unpacked dir) matching the image tag")
    ap.add_argument("--router-wheel", required=True, help="sglang_router wheel (or unpacked dir)")
    ap.add_argument("-o", "--output", default="slime_flags.txt")
    a = ap.parse_args()

    slime_commit = git(a.slime_git, "rev-parse", a.slime_rev).strip()
    dockerfile = git(a.slime_git, "show", f"{slime_commit}:docker/Dockerfile")
    meg_rev = a.megatron_rev or re.search(r"ARG MEGATRON_COMMIT=(\S+)", dockerfile).group(1)
    patch_ver = a.patch_version or re.search(r"ARG PATCH_VERSION=(\S+)", dockerfile).group(1)
    sgl_tag = re.search(r"ARG SGLANG_IMAGE_TAG=(\S+)", dockerfile).group(1)
    meg_commit = git(a.megatron_git, "rev-parse", meg_rev).strip()
    patch_files = [p for p in git(a.slime_git, "ls-tree", "--name-only", slime_commit, f"docker/patch/{patch_ver}/").split()]

    def patches(prefix):
        return [(p, git(a.slime_git, "show", f"{slime_commit}:{p}", binary=True))
                for p in sorted(patch_files) if os.path.basename(p).startswith(prefix)]

    with tempfile.TemporaryDirectory() as tmp:
        # Megatron at the pinned commit + slime's megatron patches
        mdir = os.path.join(tmp, "megatron")
        os.makedirs(mdir)
        tar = git(a.megatron_git, "archive", meg_commit, "megatron", binary=True)
        tarfile.open(fileobj=io.BytesIO(tar)).extractall(mdir)
        for name, body in patches("megatron"):
            pfile = os.path.join(tmp, os.path.basename(name))
            with open(pfile, "wb") as f:
                f.write(body)
            r = subprocess.run(["git", "apply", pfile], cwd=mdir, capture_output=True)
            if r.returncode:
                warn(f"{name} did not apply: {r.stderr.decode().strip()}")
        meg = megatron_flags(mdir)

        slime_src = git(a.slime_git, "show", f"{slime_commit}:slime/utils/arguments.py")
        sgl_side_src = git(a.slime_git, "show", f"{slime_commit}:slime/backends/sglang_utils/arguments.py")
        slime_main = slime_main_flags(slime_src)
        sgl_own, skipped = slime_sglang_side(sgl_side_src)

        sa_rel = "sglang/srt/server_args.py"
        sa_src = apply_patches(os.path.join(tmp, "sgl"), sa_rel, read_from_wheel_or_dir(a.sglang_wheel, sa_rel),
                               patches("sglang"), strip=2)
        server = sglang_server_flags(sa_src, skipped)
        router = router_flags(read_from_wheel_or_dir(a.router_wheel, "sglang_router/router_args.py"))

    sgl_version = dist_version(a.sglang_wheel)
    rt_version = dist_version(a.router_wheel)

    sglang_parser = sgl_own | server | router
    everything = meg | slime_main | sglang_parser
    longs = sorted(f for f in everything if f.startswith("--"))
    shorts = sorted(f for f in everything if not f.startswith("--"))

    header = [
        "# Command-line flags accepted by slime train.py / train_async.py.",
        f"# slime       THUDM/slime {slime_commit}",
        f"# Megatron-LM NVIDIA/Megatron-LM {meg_commit} (MEGATRON_COMMIT in slime docker/Dockerfile)",
        f"#             + slime docker/patch/{patch_ver}/megatron*.patch applied",
        f"# sglang      {sgl_version} (PyPI wheel; slime image tag SGLANG_IMAGE_TAG={sgl_tag})",
        f"#             + slime docker/patch/{patch_ver}/sglang*.patch hunks for {sa_rel} applied",
        f"# sglang_router {rt_version} RouterArgs (PyPI wheel; slime's image installs the zhuzilin",
        "#             sgl-router fork v0.3.2-9daabcd, whose router_args.py was not available)",
        "# Made by make_slime_flags.py: static (ast) reading of the sources above, emulating",
        "#   Megatron's ArgumentGroupFactory (dataclass fields, --no-/--disable- for bool fields",
        "#   whose default is not False, argparse_meta arg_names), sglang's Annotated/Arg fields",
        "#   (cli_name, aliases, no_cli), slime's --sglang- prefixing and skipped_args, and",
        "#   RouterArgs with use_router_prefix=True, exclude_host_port=True; argparse's",
        "#   BooleanOptionalAction --no-X forms included (for --sglang-X they are --no-sglang-X).",
        "# Cross-checked once by building the real parsers (Megatron add_megatron_arguments +",
        "#   slime add_slime_arguments; slime add_sglang_arguments with the real ServerArgs and",
        "#   RouterArgs; CPU torch, unrelated imports stubbed): identical except the pre-parser",
        "#   flags (not in that harness) and --kitchen-config-file/--kitchen-recipe-number, which",
        "#   Megatron adds only when NVIDIA kitchen is importable (kept here to be safe).",
        f"# counts: megatron {len(meg)}, slime {len(slime_main)}, slime sglang-side {len(sgl_own)},",
        f"#   sglang ServerArgs (--sglang-) {len(server)}, router {len(router)}; total long flags {len(longs)}",
        "# NOTE: every slime parser uses parse_known_args, so slime itself never rejects an",
        "#   unknown flag: a misspelled flag is silently ignored.  The sglang-side parser",
        "#   has allow_abbrev=True, so unique prefixes of --sglang-*/--router-* flags (and of the",
        "#   few slime flags on that parser) are accepted too; Megatron's parser and slime's",
        "#   pre-parser set allow_abbrev=False.  A flag followed by ` prefix` sits on a parser",
        "#   with allow_abbrev=True: a unique prefix of it is accepted as that flag.",
        "#   `--flag=value` is accepted for any flag.",
        f"# short options: {' '.join(shorts) if shorts else '(none)'}",
    ]
    if WARNINGS:
        header.append("# generator warnings:")
        header += [f"#   {w}" for w in WARNINGS]
    # the temporary parser inside slime's SGLang step takes prefixes too
    prefix_ok = sglang_parser | {"--rollout-num-gpus-per-engine", "--sglang-pp-size", "--sglang-pipeline-parallel-size"}
    with open(a.output, "w") as f:
        f.write("\n".join(header + [f"{flag} prefix" if flag in prefix_ok else flag for flag in longs]) + "\n")
    print(f"{len(longs)} long flags written to {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
