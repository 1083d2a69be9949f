"""Deployment files (Dockerfiles, compose, Ray cluster config, .dockerignore) against the repository.

No Docker engine or cluster runs here: the files are parsed and checked for what would otherwise
only fail on someone else's machine: every repository path they use exists (and reaches the
image), every command they run is a console script of pyproject or a known tool, every
gradcomp-launch flag exists in the launcher's argparse, images run as a non-root user, Ray token
authentication is on with the token kept out of the repository, the dashboard is not published
beyond localhost. The checker is tested too: broken copies in tmp_path must fail it.

The shell parsing is deliberately small (the subset these files use: `&&`, `||`, `;`, `|`,
sub-shells, env prefixes, `bash -c`, `tini --`, `exec`); a file that outgrows it fails loudly.
"""

from __future__ import annotations

import json
import posixpath
import re
import secrets
import shlex
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML comes with ray (the `ray` extra)

REPO = Path(__file__).resolve().parents[2]

DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.cuda")
COMPOSE = "docker/compose.yaml"
CLUSTER = "launch/cluster.yaml"
DOCKERIGNORE = ".dockerignore"
DOCS = ("docker/README.md", "launch/README.md")
# Files scanned for committed secrets.
SECRET_SCAN = DOCKERFILES + (COMPOSE, CLUSTER, DOCKERIGNORE, "docker/join-cluster.sh") + DOCS

# Programs the deploy files may run besides pyproject's console scripts.
KNOWN_TOOLS = {"ray", "python", "python3", "pip", "pip3", "bash", "sh", "tini", "horovodrun"}
SHELL_BUILTINS = {"cd", "exec", "export", "ulimit", "test", "[", "true", "echo", "grep", "set",
                  "chmod", "mkdir"}
# The launcher interface agreed in the project's contracts (gradcomp-launch flags). The deploy
# files stay within it; build_parser() of gradcomp.app.launch is the authority when it is importable.
CONTRACT_FLAGS = {"--workers", "--codec", "--bits", "--sparsity", "--budget-bits", "--model",
                  "--act-bits", "--dataset", "--epochs", "--address", "--transport",
                  "--gpus-per-worker", "--output", "--resume", "--help", "-h"}
LAUNCHER = "gradcomp-launch"

PATH_SUFFIXES = (".sh", ".py", ".toml", ".txt", ".yaml", ".yml", ".cfg", ".md")
TOP_DIRS = {"gradcomp", "launch", "docker", "benchmarks", "tests", ".ci"}
BUILT_PREFIXES = (".venv/", ".venv")  # made by setup on the machine, never in the repository
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Must stay out of every image: local environments, VCS data, build outputs, results.
MUST_IGNORE = (".venv", ".git", "build", "dist", "runs", "out", "results", "gradcomp.egg-info",
               "gradcomp/__pycache__")


@dataclass
class Report:
    """Problems found, and every gradcomp-launch invocation seen (for the flag checks)."""

    problems: list[str] = field(default_factory=list)
    invocations: list[tuple[str, list[str]]] = field(default_factory=list)

    def add(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}")


# ---------------------------------------------------------------------------------------- repo


def console_scripts(root: Path) -> set[str]:
    """Names in pyproject's [project.scripts]."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # python 3.10: read the one table by hand
        m = re.search(r"^\[project\.scripts\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        return set(re.findall(r"^\s*([\w.-]+)\s*=", m.group(1), re.M)) if m else set()
    return set(tomllib.loads(text).get("project", {}).get("scripts", {}))


def pyproject_readme(root: Path) -> str | None:
    m = re.search(r'^readme\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else None


def run_sh_subcommands(root: Path) -> set[str]:
    """The `case` labels of run.sh (`bash run.sh X` must use one of them)."""
    return set(re.findall(r"^\s*([a-z][\w-]*)\)", (root / "run.sh").read_text(), re.M))


def dockerignore_patterns(root: Path) -> list[str]:
    path = root / DOCKERIGNORE
    if not path.is_file():
        return []
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out (last matching pattern wins; `!` re-includes).

    A pattern matching a directory excludes everything under it, as Docker does.
    """
    path = posixpath.normpath(path[2:] if path.startswith("./") else path)
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = posixpath.normpath(pat[1:] if negate else pat).lstrip("/")
        rx = _glob_regex(pat)
        if any(rx.match(p) for p in prefixes):
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------------------- shell


def simple_commands(script: str) -> list[list[str]]:
    """Split a shell snippet into simple commands (argv lists)."""
    script = script.replace("\\\n", " ")
    out = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lex.whitespace_split = True
        lex.commenters = "#"
        cur: list[str] = []
        for tok in lex:
            if tok in SEPARATORS or set(tok) <= set(";&|()"):  # shlex groups e.g. ");"
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(tok)
        if cur:
            out.append(cur)
    return out


def strip_prefixes(argv: list[str]) -> list[str]:
    """Drop env assignments (`A=b cmd`) and `exec`."""
    i = 0
    while i < len(argv) and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[i]) or argv[i] in ("exec", "!")):
        i += 1
    return argv[i:]


def repo_path(token: str, aliases: tuple[str, ...]) -> str | None:
    """The repository path a command token names, or None when it names none."""
    t = token.strip("'\"")
    for alias in aliases:
        if alias.rstrip("/") == "":
            continue  # WORKDIR / (not set yet): the repository is not there
        if t == alias:
            return "."
        if t.startswith(alias.rstrip("/") + "/"):
            rel = t[len(alias.rstrip("/")) + 1:]
            return None if rel.startswith(BUILT_PREFIXES) else rel
    if not t or t.startswith(("/", "~", "$", "-")) or "://" in t or "=" in t or "$" in t:
        return None
    t = t[2:] if t.startswith("./") else t
    if t.startswith(BUILT_PREFIXES):
        return None
    if t.endswith(PATH_SUFFIXES) or ("/" in t and t.split("/")[0] in TOP_DIRS):
        return t
    return None


@dataclass
class Ctx:
    """What a command is checked against."""

    root: Path
    scripts: set[str]
    run_sh: set[str]
    aliases: tuple[str, ...]
    check_programs: bool = True


# Repository scripts that run the rest of their arguments as a command, after N arguments of
# their own: the command they pass through is checked like any other.
WRAPPERS = {"docker/join-cluster.sh": 1}


def _record(rep: Report, where: str, args: list[str]) -> None:
    if (where, args) not in rep.invocations:
        rep.invocations.append((where, args))


def check_argv(argv: list[str], where: str, ctx: Ctx, rep: Report) -> None:
    """Check one simple command: its program, the repo paths it names, launcher invocations."""
    argv = strip_prefixes(argv)
    if not argv:
        return
    for tok in argv:
        p = repo_path(tok, ctx.aliases)
        if p is not None and not (ctx.root / p).exists():
            rep.add(where, f"names {p!r}, which is not in the repository")
    # wherever the launcher appears (also behind `docker compose run ...` in the docs)
    for k, tok in enumerate(argv):
        if posixpath.basename(tok) == LAUNCHER:
            _record(rep, where, argv[k + 1:])
        elif posixpath.basename(tok).startswith("python") and argv[k + 1:k + 3] == ["-m", "gradcomp.app.launch"]:
            _record(rep, where, argv[k + 3:])
    prog = argv[0]
    base = posixpath.basename(prog)
    if base == "tini":
        rest = argv[1:]
        if "--" in rest:
            check_argv(rest[rest.index("--") + 1:], where, ctx, rep)
        return
    if base in ("bash", "sh"):
        args = argv[1:]
        if args[:1] == ["-c"] and len(args) > 1:
            check_script(args[1], where, ctx, rep)
            return
        k = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        if k is None:
            return
        script = repo_path(args[k], ctx.aliases) or args[k]
        if posixpath.basename(script) == "run.sh":
            sub = args[k + 1] if k + 1 < len(args) else None
            if sub not in ctx.run_sh:
                rep.add(where, f"`run.sh {sub}` is not a run.sh subcommand ({sorted(ctx.run_sh)})")
        elif script in WRAPPERS and len(args) > k + 1 + WRAPPERS[script]:
            check_argv(args[k + 1 + WRAPPERS[script]:], where, ctx, rep)
        return
    if base == "ray" and argv[1:2] == ["exec"]:  # ray exec CONFIG 'command on the head'
        positional = [a for a in argv[2:] if not a.startswith("-")]
        if len(positional) >= 2:
            check_script(positional[1], where, replace(ctx, check_programs=False), rep)
    if not ctx.check_programs:
        return
    if base in ctx.scripts or base in KNOWN_TOOLS or base in SHELL_BUILTINS:
        return
    if repo_path(prog, ctx.aliases) is not None:
        return  # a repository script run directly (its existence is checked above)
    rep.add(where, f"runs {prog!r}: neither a console script of pyproject ({sorted(ctx.scripts)}) "
                   f"nor a known tool")


def check_script(script: str, where: str, ctx: Ctx, rep: Report) -> None:
    for argv in simple_commands(script):
        check_argv(argv, where, ctx, rep)


# ---------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str] | None:
    try:
        v = json.loads(args)
    except ValueError:
        return None
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def check_dockerfile(root: Path, rel: str, rep: Report, scripts: set[str], run_sh: set[str]) -> None:
    path = root / rel
    if not path.is_file():
        rep.add(rel, "missing")
        return
    ignore = dockerignore_patterns(root)
    instr = dockerfile_instructions(path.read_text())
    # only the final stage is checked for user/entrypoint; paths are checked in every stage
    workdir, copied, user, users_made, entry, cmd = "/", [], None, set(), None, None
    env_text = ""
    horovod_built = False
    constraints_pin = re.search(r"^torch==(\S+)", (root / "constraints.txt").read_text(), re.M)
    for word, args in instr:
        where = f"{rel}: {word} {args[:60]}"
        if word == "FROM":
            workdir, copied, user, users_made, entry, cmd, env_text = "/", [], None, set(), None, None, ""
        elif word == "WORKDIR":
            if "$" in args:
                rep.add(where, "WORKDIR must be literal (the checker maps it to the repository)")
            workdir = posixpath.normpath(posixpath.join(workdir, args))
        elif word == "USER":
            user = args.split(":")[0].strip()
        elif word in ("ENV", "ARG"):
            env_text += " " + args
        elif word in ("COPY", "ADD"):
            form = _exec_form(args)
            toks = form if form is not None else shlex.split(args)
            flags = [t for t in toks if t.startswith("--")]
            files = [t for t in toks if not t.startswith("--")]
            if any(f.startswith("--from") for f in flags) or len(files) < 2:
                continue
            *srcs, dest = files
            dest_abs = posixpath.normpath(posixpath.join(workdir, dest))
            for src in srcs:
                if "://" in src:
                    rep.add(where, "ADD of a URL: fetch in a RUN with a pinned checksum instead")
                    continue
                norm = posixpath.normpath(src)
                if not (root / norm).exists():
                    rep.add(where, f"copies {src!r}, which is not in the repository")
                elif norm != "." and dockerignored(norm, ignore):
                    rep.add(where, f"copies {src!r}, which .dockerignore leaves out of the context")
                into_dir = dest.endswith("/") or len(srcs) > 1 or norm == "."
                target = posixpath.normpath(posixpath.join(dest_abs, posixpath.basename(norm))) \
                    if into_dir and norm != "." else dest_abs
                if target == posixpath.normpath(posixpath.join(workdir, norm)):
                    copied.append(norm)  # repository layout kept under WORKDIR
        elif word == "RUN":
            ctx = Ctx(root, scripts, run_sh, (workdir,), check_programs=False)
            check_script(args, where, ctx, rep)
            for argv in simple_commands(args):
                for tok in argv:
                    p = repo_path(tok, (workdir,))
                    if p is None or not (root / p).exists():
                        continue
                    if not any(c == "." or p == c or p.startswith(c + "/") for c in copied):
                        rep.add(where, f"uses {p!r} before a COPY brings it into {workdir}")
                    if p.endswith("build_horovod.sh"):
                        horovod_built = True
                        if rel.endswith(".cuda") and "HOROVOD_GPU_OPERATIONS=NCCL" not in env_text + args:
                            rep.add(where, "CUDA image: build Horovod with HOROVOD_GPU_OPERATIONS=NCCL")
                argv2 = strip_prefixes(argv)
                if "pip" in argv2 and "install" in argv2 or argv2[1:3] == ["-m", "pip"] and "install" in argv2:
                    pkgs = [t for t in argv2 if re.match(r"^torch(\W|$)", t)]
                    if pkgs and "constraints.txt" not in argv2:
                        rep.add(where, "installs torch without `-c constraints.txt` (the pin)")
                    for t in pkgs:
                        m = re.match(r"^torch==(\S+)$", t)
                        if m and constraints_pin and m.group(1) != constraints_pin.group(1):
                            rep.add(where, f"torch=={m.group(1)} disagrees with constraints.txt")
        elif word in ("ENTRYPOINT", "CMD"):
            form = _exec_form(args)
            if form is None:
                rep.add(where, f"{word} in shell form: use the exec form (JSON) so signals reach the process")
                form = shlex.split(args)
            if word == "ENTRYPOINT":
                entry, cmd = form, None  # a new ENTRYPOINT resets CMD
            else:
                cmd = form
        if word == "RUN" and re.search(r"\buseradd\b|\badduser\b", args):
            users_made.update(re.findall(r"(?:useradd|adduser)\b[^;&|]*?\s([a-z_][\w-]*)\s*(?:$|[;&|])", args))
    if user is None:
        rep.add(rel, "no USER in the final stage: the image would run as root")
    elif user in ("root", "0") or user.startswith("$"):
        rep.add(rel, f"final USER is {user!r}: run as a non-root user created in the image")
    elif user not in users_made:
        rep.add(rel, f"USER {user!r} is never created (useradd) in the final stage")
    if not horovod_built:
        rep.add(rel, "does not build Horovod with launch/build_horovod.sh")
    if rel == "docker/Dockerfile" and "download.pytorch.org/whl/cpu" not in env_text:
        rep.add(rel, "the CPU image must take torch from the PyTorch CPU wheel index (ARG TORCH_INDEX_URL)")
    argv = (entry or []) + (cmd or [])
    if not argv:
        rep.add(rel, "no ENTRYPOINT/CMD")
    else:
        check_argv(argv, f"{rel}: ENTRYPOINT+CMD", Ctx(root, scripts, run_sh, (workdir,)), rep)


# ------------------------------------------------------------------------------------- compose


def _as_argv(value) -> list[list[str]]:
    """A compose command/entrypoint/healthcheck value as simple commands."""
    if value is None:
        return []
    if isinstance(value, str):
        return simple_commands(value)
    value = [str(v) for v in value]
    if value and value[0] == "CMD-SHELL":
        return simple_commands(" ".join(value[1:]))
    if value and value[0] == "CMD":
        value = value[1:]
    return [value]


def _published_host_ip(port) -> str | None:
    if isinstance(port, dict):
        return port.get("host_ip")
    text = str(port)
    if text.startswith("["):  # [::1]:8265:8265
        return text[:text.index("]") + 1]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else None


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def check_compose(root: Path, rep: Report, scripts: set[str], run_sh: set[str]) -> None:
    path = root / COMPOSE
    if not path.is_file():
        rep.add(COMPOSE, "missing")
        return
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services") or {}
    top_secrets = doc.get("secrets") or {}
    head_port = None
    workers = 0
    jobs = []
    workdirs = {}
    for rel in DOCKERFILES:
        wd = [a for w, a in dockerfile_instructions((root / rel).read_text()) if w == "WORKDIR"] \
            if (root / rel).is_file() else []
        workdirs[rel] = posixpath.normpath(wd[-1]) if wd else "/"
    for name, svc in services.items():
        where = f"{COMPOSE}: service {name}"
        build = svc.get("build")
        dockerfile = "docker/Dockerfile"
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            ctx_dir = (path.parent / context).resolve()
            if ctx_dir != root.resolve():
                rep.add(where, f"build context {context!r} is not the repository root")
            if isinstance(build, dict) and "dockerfile" in build:
                dockerfile = build["dockerfile"]
            if not (ctx_dir / dockerfile).is_file():
                rep.add(where, f"dockerfile {dockerfile!r} not found in the build context")
            if svc.get("pull_policy") not in ("build", "never"):
                rep.add(where, "builds its image: set pull_policy: build so that no registry image is pulled")
        elif "image" not in svc:
            rep.add(where, "neither build nor image")
        user = str(svc.get("user", "")).split(":")[0]
        if user in ("root", "0"):
            rep.add(where, f"runs as user {user!r}")
        for port in svc.get("ports") or []:
            host_ip = _published_host_ip(port)
            if host_ip not in LOOPBACK:
                rep.add(where, f"publishes {port!r} beyond localhost (bind it to 127.0.0.1)")
        # token authentication
        env = _env(svc)
        if env.get("RAY_AUTH_MODE") != "token":
            rep.add(where, "RAY_AUTH_MODE must be 'token' on every Ray node and client")
        if "RAY_AUTH_TOKEN" in env:
            rep.add(where, "RAY_AUTH_TOKEN in the environment: pass the token as a file (RAY_AUTH_TOKEN_PATH + a secret)")
        token_path = env.get("RAY_AUTH_TOKEN_PATH") or ""
        m = re.fullmatch(r"/run/secrets/([\w.-]+)", token_path)
        svc_secrets = [s if isinstance(s, str) else s.get("source") for s in svc.get("secrets") or []]
        if not m:
            rep.add(where, "RAY_AUTH_TOKEN_PATH must name a compose secret (/run/secrets/NAME)")
        elif m.group(1) not in svc_secrets or m.group(1) not in top_secrets:
            rep.add(where, f"secret {m.group(1)!r} is not declared (service and top-level secrets)")
        else:
            src = str((top_secrets[m.group(1)] or {}).get("file", ""))
            if not src.startswith("${"):
                rep.add(where, f"secret file {src!r} is fixed in the compose file: take it from a variable "
                               "so that no token file lives in the repository")
        # commands
        wd = workdirs.get(dockerfile, "/")
        ctx = Ctx(root, scripts, run_sh, (wd,))
        entry = svc.get("entrypoint")
        command = svc.get("command")
        if entry is not None:
            e = _as_argv(entry)
            c = _as_argv(command)
            argv_lists = [e[0] + (c[0] if c else [])] if len(e) == 1 else e + c
        else:
            argv_lists = _as_argv(command)
        for argv in argv_lists:
            check_argv(argv, f"{where} command", ctx, rep)
        for argv in _as_argv((svc.get("healthcheck") or {}).get("test")):
            check_argv(argv, f"{where} healthcheck", ctx, rep)
        flat = [strip_prefixes(a) for a in argv_lists]
        for a in flat:
            joined = " ".join(a)
            if "ray start" in joined and "--head" in a:
                pm = re.search(r"--port[= ](\d+)", joined)
                head_port = (name, pm.group(1) if pm else "6379")
            elif "ray start" in joined and "--address" in joined and entry is None:
                workers += int((svc.get("deploy") or {}).get("replicas", 1))
            if any(posixpath.basename(t) == LAUNCHER for t in a):
                jobs.append((name, a))
    if head_port is None:
        rep.add(COMPOSE, "no Ray head service (ray start --head)")
    if workers < 2:
        rep.add(COMPOSE, f"{workers} Ray worker container(s); want at least 2")
    if not jobs:
        rep.add(COMPOSE, f"no job service running {LAUNCHER}")
    for name, argv in jobs:
        k = next(i for i, t in enumerate(argv) if posixpath.basename(t) == LAUNCHER)
        args = argv[k + 1:]
        addr = next((args[i + 1] for i, t in enumerate(args[:-1]) if t == "--address"),
                    next((t.split("=", 1)[1] for t in args if t.startswith("--address=")), None))
        if head_port is not None and addr != f"{head_port[0]}:{head_port[1]}":
            rep.add(f"{COMPOSE}: service {name}", f"{LAUNCHER} --address {addr!r}, want "
                                                  f"'{head_port[0]}:{head_port[1]}' (the head)")


# ------------------------------------------------------------------------------------- cluster


def check_cluster(root: Path, rep: Report, scripts: set[str], run_sh: set[str]) -> None:
    path = root / CLUSTER
    if not path.is_file():
        rep.add(CLUSTER, "missing")
        return
    cfg = yaml.safe_load(path.read_text())
    provider = cfg.get("provider") or {}
    if provider.get("type") != "local":
        rep.add(CLUSTER, "provider.type must be 'local' (on-prem)")
    if not provider.get("head_ip") or not provider.get("worker_ips"):
        rep.add(CLUSTER, "provider needs head_ip and worker_ips")
    mounts = cfg.get("file_mounts") or {}
    aliases = tuple(k for k, v in mounts.items() if str(v).rstrip("/") in (".", "./"))
    if not aliases:
        rep.add(CLUSTER, "file_mounts does not mount the repository ('.')")
    token_mounts = [(k, v) for k, v in mounts.items() if str(k).endswith("auth_token")]
    if not token_mounts:
        rep.add(CLUSTER, "file_mounts does not distribute the Ray token (~/.ray/auth_token)")
    for k, v in token_mounts:
        local = (root / str(v)).resolve() if not str(v).startswith(("~", "/")) else None
        if local is not None:
            rep.add(CLUSTER, f"the token is mounted from {v!r} inside the repository")
    ctx = Ctx(root, scripts, run_sh, aliases)
    groups = ("initialization_commands", "setup_commands", "head_setup_commands",
              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    all_cmds = []
    for group in groups:
        for cmd in cfg.get(group) or []:
            all_cmds.append((group, str(cmd)))
            check_script(str(cmd), f"{CLUSTER}: {group}", ctx, rep)
    setup_text = " ; ".join(c for g, c in all_cmds if "setup" in g)
    if not re.search(r"\bbash run\.sh setup\b", setup_text):
        rep.add(CLUSTER, "setup_commands do not run `bash run.sh setup`")
    if "launch/build_horovod.sh" not in setup_text and "GRADCOMP_HOROVOD=0" in setup_text:
        rep.add(CLUSTER, "setup_commands skip the Horovod build")
    for group, cmd in all_cmds:
        for argv in simple_commands(cmd):
            body = strip_prefixes(argv)
            if len(body) > 1 and posixpath.basename(body[0]) == "ray" and body[1] == "start":
                env = argv[:len(argv) - len(body)]
                exported = re.search(r"export\s+RAY_AUTH_MODE=token\b", cmd)
                if "RAY_AUTH_MODE=token" not in env and not exported:
                    rep.add(f"{CLUSTER}: {group}", "`ray start` without RAY_AUTH_MODE=token")
            for t in body:
                m = re.match(r"--dashboard-host[= ]?(.*)", t)
                if m:
                    host = m.group(1) or (body[body.index(t) + 1] if body.index(t) + 1 < len(body) else "")
                    if host not in LOOPBACK:
                        rep.add(f"{CLUSTER}: {group}", f"dashboard bound to {host!r}: keep it on localhost "
                                                       "(reach it with `ray dashboard`)")
    for group in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any(re.search(r"\bray start\b", c) for g, c in all_cmds if g == group):
            rep.add(CLUSTER, f"{group} does not start Ray")


# --------------------------------------------------------------------------------- other files


HEX_TOKEN = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])")
ASSIGNED_SECRET = re.compile(
    r"\b(RAY_AUTH_TOKEN|[A-Z_]*PASSWORD|[A-Z_]*SECRET_KEY|[A-Z_]*API_KEY)\s*[:=]\s*[\"']?([^\s\"'$<{][^\s\"']*)")


def check_secrets(root: Path, rep: Report) -> None:
    """No token, key or password literal in the deploy files (Ray's tokens are 64 hex digits)."""
    for rel in SECRET_SCAN:
        path = root / rel
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if HEX_TOKEN.search(line):
                rep.add(f"{rel}:{n}", "a long hex literal (a token?) is committed")
            m = ASSIGNED_SECRET.search(line)
            if m:
                rep.add(f"{rel}:{n}", f"{m.group(1)} is given a literal value")
            if "PRIVATE KEY-----" in line:
                rep.add(f"{rel}:{n}", "a private key is committed")


def check_dockerignore(root: Path, rep: Report) -> None:
    pats = dockerignore_patterns(root)
    if not (root / DOCKERIGNORE).is_file():
        rep.add(DOCKERIGNORE, "missing")
        return
    for p in MUST_IGNORE:
        if not dockerignored(p, pats):
            rep.add(DOCKERIGNORE, f"{p!r} is not excluded from the build context")
    needed = ["run.sh", "pyproject.toml", "constraints.txt", "gradcomp/__init__.py", "launch/build_horovod.sh",
              "docker/join-cluster.sh"]
    readme = pyproject_readme(root)
    if readme:
        needed.append(readme)  # `pip install -e .` reads it
    for p in needed:
        if dockerignored(p, pats):
            rep.add(DOCKERIGNORE, f"excludes {p!r}, which the image build needs")


def check_docs(root: Path, rep: Report, scripts: set[str], run_sh: set[str]) -> None:
    """Shell code blocks of the READMEs: paths, run.sh subcommands, launcher flags."""
    for rel in DOCS:
        path = root / rel
        if not path.is_file():
            rep.add(rel, "missing")
            continue
        blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", path.read_text(), re.S)
        ctx = Ctx(root, scripts, run_sh, (), check_programs=False)
        for block in blocks:
            check_script(block, rel, ctx, rep)


def check_all(root: Path) -> Report:
    rep = Report()
    scripts = console_scripts(root)
    run_sh = run_sh_subcommands(root)
    for rel in DOCKERFILES:
        check_dockerfile(root, rel, rep, scripts, run_sh)
    check_compose(root, rep, scripts, run_sh)
    check_cluster(root, rep, scripts, run_sh)
    check_dockerignore(root, rep)
    check_docs(root, rep, scripts, run_sh)
    check_secrets(root, rep)
    return rep


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-")]


def unknown_flags(rep: Report, known: set[str]) -> list[str]:
    return [f"{where}: {LAUNCHER} {flag}" for where, args in rep.invocations for flag in _flags(args)
            if flag not in known]


def launch_parser():
    """gradcomp.app.launch.build_parser(), or skip when the launcher module does not exist."""
    try:
        import gradcomp.app.launch as launch
    except ModuleNotFoundError as e:
        if e.name == "gradcomp.app.launch":
            pytest.skip("gradcomp.app.launch is not written yet: flags were checked against the agreed list only")
        raise
    assert hasattr(launch, "build_parser"), "gradcomp.app.launch must expose build_parser() (contract)"
    return launch.build_parser()


# ------------------------------------------------------------------------------------- the tests


def test_deploy_files_are_consistent_with_the_repository():
    rep = check_all(REPO)
    assert rep.problems == [], "\n".join(rep.problems)


def test_deploy_files_invoke_the_launcher():
    rep = check_all(REPO)
    sources = {where.split(":")[0] for where, _ in rep.invocations}
    assert COMPOSE in sources and set(DOCS) & sources, sources  # compose's job; the docs' examples
    assert LAUNCHER in console_scripts(REPO), f"pyproject must declare the {LAUNCHER} console script"


def test_launcher_flags_are_in_the_agreed_interface():
    rep = check_all(REPO)
    assert rep.invocations
    assert unknown_flags(rep, CONTRACT_FLAGS) == []


def test_launcher_invocations_parse_with_build_parser():
    parser = launch_parser()
    known = set(parser._option_string_actions)
    rep = check_all(REPO)
    assert unknown_flags(rep, known) == []
    for where, args in rep.invocations:
        if "--help" in args or "-h" in args:
            continue
        args = [a for a in args if not a.startswith("${")]
        try:
            parser.parse_args(args)
        except SystemExit as e:  # argparse reports on stderr and exits 2
            pytest.fail(f"{where}: `{LAUNCHER} {' '.join(args)}` does not parse (exit {e.code})")


def test_cluster_yaml_passes_rays_own_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    import copy

    cfg = yaml.safe_load((REPO / CLUSTER).read_text())
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


def test_dockerignore_matching():
    pats = ["**/.venv", "runs", "*.egg-info", "!keep.egg-info", "docs/*.md"]
    assert dockerignored("a/b/.venv/lib/x.py", pats)
    assert dockerignored(".venv", pats)
    assert dockerignored("runs/2024/results.json", pats)
    assert not dockerignored("gradcomp/runs.py", pats)
    assert dockerignored("gradcomp.egg-info/PKG-INFO", pats)
    assert not dockerignored("keep.egg-info", pats)
    assert dockerignored("docs/a.md", pats) and not dockerignored("docs/sub/a.md", pats)


def test_shell_splitting():
    cmds = simple_commands("cd ~/x && (test -x a || python3 -m venv .venv); A=1 exec ray start --head # c")
    assert cmds == [["cd", "~/x"], ["test", "-x", "a"], ["python3", "-m", "venv", ".venv"],
                    ["A=1", "exec", "ray", "start", "--head"]]
    assert strip_prefixes(cmds[-1]) == ["ray", "start", "--head"]


# ------------------------------------------------------------------------- the checker can fail


COPY_SET = (".dockerignore", "docker", "launch", "run.sh", "pyproject.toml", "constraints.txt", "README.md",
            "gradcomp/__init__.py")


@pytest.fixture
def repo_copy(tmp_path):
    """The files the deploy checks read, copied (tmp_path/repo), and passing as they are."""
    dst = tmp_path / "repo"
    for rel in COPY_SET:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dst / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    rep = check_all(dst)
    assert rep.problems == [], "\n".join(rep.problems)
    return dst


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    path = root / rel
    text = path.read_text()
    assert old in text, f"the broken-copy case no longer applies: {old!r} not in {rel}"
    path.write_text(text.replace(old, new, 1))


FAKE_TOKEN = secrets.token_hex(32)  # made at run time: no literal in this file either

BREAKAGES = {
    "root user": ("docker/Dockerfile", "USER gradcomp\n", "USER root\n", "final USER is 'root'"),
    "no user": ("docker/Dockerfile.cuda", "USER gradcomp\n", "", "no USER in the final stage"),
    "missing script": ("docker/Dockerfile", "bash launch/build_horovod.sh", "bash launch/build_hvd.sh",
                       "'launch/build_hvd.sh', which is not in the repository"),
    "copy missing file": ("docker/Dockerfile", "COPY --chown=gradcomp:gradcomp constraints.txt ./",
                          "COPY --chown=gradcomp:gradcomp constraint.txt ./", "copies 'constraint.txt'"),
    "script used before copy": ("docker/Dockerfile", "COPY --chown=gradcomp:gradcomp launch/build_horovod.sh launch/\n",
                                "", "before a COPY brings it"),
    "torch without pin": ("docker/Dockerfile", "-c constraints.txt torch", "torch", "without `-c constraints.txt`"),
    "cpu index": ("docker/Dockerfile", "https://download.pytorch.org/whl/cpu", "https://pypi.org/simple",
                  "PyTorch CPU wheel index"),
    "cuda without nccl": ("docker/Dockerfile.cuda", "HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_GPU_OPERATIONS=",
                          "HOROVOD_GPU_OPERATIONS=NCCL"),
    "shell-form cmd": ("docker/Dockerfile", 'CMD ["gradcomp-launch", "--help"]', "CMD gradcomp-launch --help",
                       "shell form"),
    "unknown command": ("docker/compose.yaml", '["gradcomp-launch", "--address"', '["gradcomp-lunch", "--address"',
                        "runs 'gradcomp-lunch'"),
    "wrong address": ("docker/compose.yaml", '"--address", "ray-head:6379"', '"--address", "ray-head:6380"',
                      "want 'ray-head:6379'"),
    "public dashboard": ("docker/compose.yaml", '"127.0.0.1:8265:8265"', '"8265:8265"', "beyond localhost"),
    "auth off": ("docker/compose.yaml", "RAY_AUTH_MODE: token", "RAY_AUTH_MODE: disabled", "RAY_AUTH_MODE must be"),
    "token literal": ("docker/compose.yaml", "RAY_USAGE_STATS_ENABLED", f"RAY_AUTH_TOKEN: {FAKE_TOKEN}\n    RAY_USAGE_STATS_ENABLED",
                      "long hex literal"),
    "secret file in repo": ("docker/compose.yaml", 'file: "${RAY_AUTH_TOKEN_FILE:?', 'file: "ray_token" # ${RAY_AUTH_TOKEN_FILE:?',
                            "is fixed in the compose file"),
    "wrong context": ("docker/compose.yaml", "context: ..", "context: .", "not the repository root"),
    "compose root user": ("docker/compose.yaml", "  pull_policy: build\n", "  pull_policy: build\n  user: root\n",
                          "runs as user 'root'"),
    "copied file ignored": (".dockerignore", "\n.ci\n", "\n.ci\nlaunch/*.sh\n",
                            "copies 'launch/build_horovod.sh', which .dockerignore leaves out"),
    "one worker": ("docker/compose.yaml", "replicas: 2", "replicas: 1", "want at least 2"),
    "bad run.sh subcommand": ("launch/cluster.yaml", "bash run.sh setup", "bash run.sh install",
                              "`run.sh install` is not a run.sh subcommand"),
    "worker without auth": ("launch/cluster.yaml", "RAY_AUTH_MODE=token ~/gradcomp/.venv/bin/ray start --address",
                            "~/gradcomp/.venv/bin/ray start --address", "without RAY_AUTH_MODE=token"),
    "open dashboard": ("launch/cluster.yaml", "--head --port=6379", "--head --dashboard-host=0.0.0.0 --port=6379",
                       "dashboard bound to '0.0.0.0'"),
    "no token mount": ("launch/cluster.yaml", '"~/.ray/auth_token": "~/.ray/auth_token"', "", "distribute the Ray token"),
    "venv in context": (".dockerignore", "\n.venv\n**/.venv\n", "\n", "'.venv' is not excluded"),
    "readme ignored": (".dockerignore", "\n.gitignore\n", "\n.gitignore\n*.md\n", "excludes 'README.md'"),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_checker_rejects_a_broken_copy(repo_copy, case):
    rel, old, new, expected = BREAKAGES[case]
    _edit(repo_copy, rel, old, new)
    problems = check_all(repo_copy).problems
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in:\n" + "\n".join(problems)


def test_checker_rejects_unknown_launcher_flags(repo_copy):
    _edit(repo_copy, "docker/compose.yaml", '"--epochs", "2"', '"--epochs", "2", "--no-such-flag"')
    rep = check_all(repo_copy)
    assert rep.problems == []
    bad = unknown_flags(rep, CONTRACT_FLAGS)
    assert bad and all("--no-such-flag" in b for b in bad), bad


def test_checker_rejects_an_undeclared_console_script(repo_copy):
    _edit(repo_copy, "pyproject.toml", 'gradcomp-launch = "gradcomp.app.launch:main"\n', "")
    problems = check_all(repo_copy).problems
    assert any("runs 'gradcomp-launch'" in p for p in problems), "\n".join(problems)
