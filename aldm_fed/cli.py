"""`aldm-fed` command line: parse, compose the config, call one library function.

Every command takes trailing Hydra overrides (``experiment=tiny data.size=32``), so a run is fully
described by its command line. Heavy libraries are imported inside the commands, so `--help` and
each Flower process start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm_fed import __version__

app = typer.Typer(
    name="aldm-fed",
    help="Federated anatomically-conditioned latent diffusion for few-shot 3D glioma MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Read, check, prepare and simulate BraTS-style data.", no_args_is_help=True)
config_app = typer.Typer(help="Show the composed configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

Overrides = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here
    typer.Argument(help="Hydra overrides, e.g. experiment=tiny data.size=32", show_default=False),
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


def _compose(overrides: list[str] | None):
    from aldm_fed.config import compose

    return compose(overrides or [])


def _names(values: list[str] | None) -> list[str]:
    """Names given as repeated options, comma- or space-separated (`--sites A,B`, `--sites A --sites B`)."""
    return [name for value in values or [] for name in value.replace(",", " ").split()]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _refuse_foreign_folder(out: Path, *, made_by: str, markers: tuple[str, ...], flag: str = "--force") -> None:
    """Stop unless `out` is absent, empty, or holds what an earlier run of this command wrote.

    Why: these commands resume into their output folder and rewrite their summary files there
    (labels.csv, ...); pointed at a folder of other files by mistake they would replace some.

    Args:
        out: the output folder.
        made_by: the command, for the message.
        markers: glob patterns of which any one match shows an earlier run's output.
        flag: the option that allows writing anyway.
    """
    if not out.exists():
        return
    if not out.is_dir():
        _fail(f"{out}: is a file, a folder is expected here")
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not entries or any(next(out.glob(pattern), None) is not None for pattern in markers):
        return
    _fail(f"{out}: folder holds other files ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}) and"
          f" nothing `{made_by}` wrote; choose a new or empty folder, or pass {flag} to write into it"
          " (files of the same name are replaced)")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aldm-fed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Federated anatomically-conditioned latent diffusion for few-shot 3D glioma MRI."""


@config_app.command("show")
def config_show(overrides: Overrides = None) -> None:
    """Print the composed config as YAML."""
    from omegaconf import OmegaConf

    typer.echo(OmegaConf.to_yaml(_compose(overrides), resolve=True))


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Option("--out", help="Folder for the cohort (resumes if present).")],
    overrides: Overrides = None,
    no_progress: NoProgress = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty folder that holds no phantom cohort.")
    ] = False,
) -> None:
    """Make the embedded multi-site phantom glioma cohort (no download)."""
    from aldm_fed.data.phantom import PhantomConfig, make_cohort

    if not force:  # a cohort (even one cut short) has cohort.json or PH-* case folders
        _refuse_foreign_folder(out, made_by="aldm-fed data phantom", markers=("cohort.json", "*/PH-*"))
    cfg = _compose(overrides)
    summary = make_cohort(
        out, PhantomConfig.from_mapping(cfg.phantom), seed=int(cfg.seed), progress=not no_progress
    )
    sites = ", ".join(f"{site} ({n} cases)" for site, n in summary.n_cases.items())
    typer.echo(f"cohort {out}: {sites}")
    typer.echo(
        f"  {len(summary.files_written)} files written, {len(summary.skipped)} cases kept from"
        f" before, {summary.seconds:.1f} s"
    )
    typer.echo(f"  labels: {out / 'labels.csv'}  manifests: {out / 'manifests'}/  previews: {out / 'previews'}/")


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Folder with BraTS-style case folders.")],
    overrides: Overrides = None,
    no_progress: NoProgress = False,
    json_out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--json", help="Also write the report as JSON here."),
    ] = None,
) -> None:
    """Check every case and report every problem in one pass (exit 1 if any)."""
    from aldm_fed.data.validate import check_dataset
    from aldm_fed.io import atomic_write_json

    cfg = _compose(overrides)
    report = check_dataset(root, cfg.data, progress=not no_progress)
    typer.echo(report.format_table())
    if json_out is not None:
        atomic_write_json(json_out, report.to_dict())
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("prepare")
def data_prepare(
    root: Annotated[Path, typer.Argument(help="Folder with BraTS-style case folders.")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder (resumes if present).")],
    overrides: Overrides = None,
    no_progress: NoProgress = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty --out folder that holds no cache.")
    ] = False,
) -> None:
    """Preprocess every case once into the training cache (RAS, clip/scale, crop, cube)."""
    from aldm_fed.data.preprocess import prepare_dataset

    from aldm_fed.data.brats import find_cases

    cfg = _compose(overrides)
    if not root.is_dir():
        _fail(f"{root}: not a folder")
    if not force:  # a cache (even one cut short) has index.json or case folders with meta.json
        _refuse_foreign_folder(out, made_by="aldm-fed data prepare", markers=("index.json", "*/meta.json"))
        if (out / "index.json").is_file():
            from aldm_fed.data.cache import read_index

            try:
                read_index(out)
            except ValueError as exc:  # another tool's index.json: prepare would replace it
                _fail(f"{exc}; not an aldm-fed cache: choose a new or empty folder, or pass --force")
    if not find_cases(root, str(cfg.data.scheme)):
        _fail(f"{root}: no BraTS-style case folders found (see `aldm-fed data check {root}`)")
    summary = prepare_dataset(root, out, cfg.data, progress=not no_progress)
    typer.echo(
        f"cache {out} (settings {summary.prep_hash}): {len(summary.prepared)} prepared,"
        f" {len(summary.skipped)} already cached, {len(summary.failed)} failed"
        f" of {summary.n_cases} cases, {summary.seconds:.1f} s"
    )
    for case_id, problems in summary.failed.items():
        for problem in problems:
            where = f"{problem.file}: " if problem.file else ""
            typer.echo(f"  {case_id}: {where}{problem.message}", err=True)
    if summary.failed:
        raise typer.Exit(1)


@data_app.command("manifest")
def data_manifest(
    root: Annotated[Path, typer.Argument(help="Folder with the site's BraTS-style case folders.")],
    site: Annotated[str, typer.Option("--site", help="Site name.")],
    out: Annotated[Path, typer.Option("--out", help="Manifest JSON to write.")],
    k: Annotated[int, typer.Option(help="Few-shot target cases.")] = 16,
    n_source: Annotated[int, typer.Option(help="Source-domain cases kept at this site.")] = 0,
    n_test: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Held-out test cases (default: all remaining)."),
    ] = None,
    n_val: Annotated[
        int, typer.Option(help="Validation cases: every setting is chosen on them, never on test cases (8 or more "
                          "recommended).")
    ] = 0,
    n_oracle: Annotated[
        int, typer.Option(help="Extra real cases used only by the oracle regime (its larger real pool).")
    ] = 0,
    labels: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="CSV of case-level labels."),
    ] = None,
    label_column: Annotated[str, typer.Option(help="Column to stratify splits by.")] = "grade",
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing manifest file.")] = False,
) -> None:
    """Write a site manifest with deterministic, label-stratified splits: source, target, val, test, oracle."""
    import os

    from aldm_fed.data.brats import find_cases
    from aldm_fed.data.case_labels import read_case_labels
    from aldm_fed.data.manifest import make_manifest, write_manifest

    if out.is_dir():
        _fail(f"{out}: is a folder; --out names the manifest file to write (e.g. {out / (site + '.json')})")
    if out.exists() and not force:  # new splits would silently change which patients are test patients
        _fail(f"{out}: exists; pass --force to replace it")
    case_ids = [c.case_id for c in find_cases(root)]
    if not case_ids:
        _fail(f"{root}: no BraTS-style case folders found")
    table = read_case_labels(labels, case_ids=case_ids) if labels is not None else {}
    if labels is not None:
        if not table:
            _fail(f"{labels}: no row matches a case id under {root} (e.g. {case_ids[0]!r})")
        columns = sorted({c for row in table.values() for c in row})
        matches = [c for c in columns if c.lower() == label_column.lower()]  # BraTS 2020: "Grade"
        if not matches:
            _fail(f"{labels}: no column {label_column!r} (columns: {columns})")
        label_column = matches[0]
        if table.missing:
            typer.echo(f"warning: {len(table.missing)} case(s) have no row in {labels}", err=True)
    data_root = os.path.relpath(root.resolve(), out.resolve().parent)
    manifest = make_manifest(
        site,
        case_ids,
        k=k,
        n_source=n_source,
        n_test=n_test,
        n_val=n_val,
        n_oracle=n_oracle,
        labels=table,
        label_column=label_column if table else None,
        seed=seed,
        data_root=data_root,
    )
    write_manifest(manifest, out)
    counts = {name: len(ids) for name, ids in manifest.splits.items()}
    typer.echo(f"wrote {out}: {counts}")


# Mirrors aldm_fed.training.artifacts.STAGES (tests/test_cli.py checks) without importing torch at startup.
STAGES = ("vae", "scale", "backbone", "controlnet", "gan")


@app.command("train")
def train(
    stage: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}.", show_default=False)],
    overrides: Overrides = None,
    site: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--site", help="Site to adapt (controlnet, gan); same as the override site=X."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start the stage afresh instead of resuming.")
    ] = False,
    no_progress: NoProgress = False,
) -> None:
    """Train one stage of the generative core (resumes from its last checkpoint).

    Order: vae -> scale -> backbone (on the source sites) -> controlnet (per site, --site X).
    gan: the pix2pix GAN baseline on a site's K target cases (per site, --site X; needs no other stage).
    """
    from aldm_fed.training.stages import run_stage

    if stage not in STAGES:
        _fail(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    cfg = _compose([*(overrides or []), *([f"site={site}"] if site else [])])
    result = run_stage(cfg, stage, progress=not no_progress, overwrite=overwrite)
    _echo_result(f"train {stage}", result.to_dict())


@app.command("synthesize")
def synthesize(
    overrides: Overrides = None,
    site: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--site", help="Site whose masks and ControlNet to use (override site=X)."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Output folder (default: paths.synthesis); resumes if present."),
    ] = None,
    no_progress: NoProgress = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty --out folder that holds no synthesis output.")
    ] = False,
) -> None:
    """Synthesize BraTS-style volumes from augmented tumour masks of a site's few-shot cases."""
    from aldm_fed.synthesis import synthesize_site

    if out is not None and not force:  # earlier output: synthesis.json, or sample folders with record.json
        _refuse_foreign_folder(out, made_by="aldm-fed synthesize", markers=("synthesis.json", "*/record.json"))
    cfg = _compose([*(overrides or []), *([f"site={site}"] if site else [])])
    summary = synthesize_site(cfg, out=out, progress=not no_progress)
    site_name = str(cfg.site)
    _echo_result(f"synthesize site {site_name}", summary.to_dict())


@app.command("evaluate")
def evaluate(
    overrides: Overrides = None,
    site: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--site", help="Site to evaluate (override site=X)."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Report folder (default: <paths.runs>/sites/<site>/classifier)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Retrain classifier runs whose folder holds another config,"
                           " and replace a report already in --out.")
    ] = False,
    split: Annotated[
        str, typer.Option("--split", help="Cases to test on: test (held-out results) or val (validation cases,"
                          " on which settings are chosen; written to classifier-val/).")
    ] = "test",
    shift_from: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--shift-from", help="Also train on another site's real target cases and test here "
                     "(shift_from_<X>: the domain gap); --shift-from A,B or --shift-from A --shift-from B. "
                     "Reads that site's data: single machine only."),
    ] = None,
    no_progress: NoProgress = False,
) -> None:
    """Train the downstream classifier per regime on a site's data; test on its held-out real cases.

    Regimes (classifier.regimes): real_only, real_aug, real_syn, syn_only, oracle. real_syn and
    syn_only use the site's synthetic volumes (run `aldm-fed synthesize --site X` first).
    The domain gap at C, classifier only:
    aldm-fed evaluate --site C --shift-from A experiment=demo classifier.regimes=[real_only]
    """
    from aldm_fed.evaluation.report import config_summary, write_report
    from aldm_fed.evaluation.site import EVAL_SPLITS, evaluate_site

    if out is not None:  # checked before hours of training, not after
        if out.exists() and not out.is_dir():
            _fail(f"{out}: is a file, a folder is expected here")
        old = sorted(p.name for p in out.glob("report.*")) if out.is_dir() else []
        if old and not overwrite:
            _fail(f"{out}: holds a report already ({', '.join(old)}); choose another --out or pass --overwrite")
    if split not in EVAL_SPLITS:
        _fail(f"--split: expected one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    cfg = _compose([*(overrides or []), *([f"site={site}"] if site else [])])
    result = evaluate_site(cfg, progress=not no_progress, overwrite=overwrite, split=split,
                          shift_from=_names(shift_from))
    context = {**config_summary(cfg), "site": result.site, "tested_on": f"{result.split} split",
               "runs": str(result.run_dir)}
    if result.notes:
        context["notes"] = " / ".join(result.notes)
    what = "held-out real test cases" if split == "test" else "validation cases (for choosing settings)"
    paths = write_report(out or result.run_dir, {result.site: result.metrics()},
                         title=f"Downstream classification, site {result.site}"
                               + ("" if split == "test" else " (validation split)"), context=context)
    typer.echo(f"evaluate site {result.site}: {result.n_test_cases} {what}")
    for row in result.rows:
        if row["status"] != "ok":
            typer.echo(f"  {row['regime']}: skipped ({row['reason']})")
            continue
        typer.echo(f"  {row['regime']}: AUC {row['auc_mean']:.3f} [{row['auc_ci_low']:.3f}, "
                   f"{row['auc_ci_high']:.3f}] ({row['n_train_cases_real']} real + "
                   f"{row['n_train_cases_syn']} synthetic training cases)")
    for note in result.notes:
        typer.echo(f"  note: {note}")
    typer.echo(f"  report: {paths['html']} (open in a browser; also {paths['md'].name}, {paths['csv'].name}, "
               f"{paths['json'].name})")


@app.command("compare")
def compare(
    overrides: Overrides = None,
    sites: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--sites", help="Target sites: --sites B C, --sites B,C or --sites B --sites C."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Report folder (default: <paths.runs>/compare)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Retrain classifier runs whose folder holds another config.")
    ] = False,
    no_progress: NoProgress = False,
) -> None:
    """Compare ALDM with its baselines and the domain shift at several sites, in ONE report.

    Runs what is missing (cohort, vae/scale/backbone, each site's ControlNet, ALDM synthesis, the
    baseline sets of baselines.enabled: noadapt, concat, gan), then every classifier regime,
    real_syn_<b>/syn_only_<b> per baseline and shift_from_<X> per other site, and writes
    report.{md,csv,json,html}. Takes baselines=compare (all three baselines) unless an override
    names baselines; resumable. Single machine only: domain shift reads every site's data.
    Example: aldm-fed compare experiment=demo --sites B C
    """
    import re

    from aldm_fed.evaluation.compare import compare as run_compare

    # Click options take one value each, so `--sites B C` leaves C among the overrides: a bare
    # name (no `=`, `~` or `+`) there is a site.
    bare = [o for o in overrides or [] if re.fullmatch(r"[A-Za-z0-9_-]+", o)]
    names = _names([*(sites or []), *bare])
    rest = [o for o in overrides or [] if o not in bare]
    if not names:
        _fail("which sites? pass --sites B C (the target sites to compare)")
    chosen = any(o.lstrip("+~").split("=")[0].split(".")[0] == "baselines" for o in rest)
    cfg = _compose([*([] if chosen else ["baselines=compare"]), *rest])
    try:
        result = run_compare(cfg, names, out=out, progress=not no_progress, overwrite=overwrite, echo=typer.echo)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc), code=1)
    for site, evaluation in result.evaluations.items():
        typer.echo(f"site {site}: {evaluation.n_test_cases} held-out real test cases")
        for row in evaluation.rows:
            if row["status"] != "ok":
                typer.echo(f"  {row['regime']}: skipped ({row['reason']})")
                continue
            typer.echo(f"  {row['regime']}: AUC {row['auc_mean']:.3f} [{row['auc_ci_low']:.3f}, "
                       f"{row['auc_ci_high']:.3f}]")
    typer.echo(f"report: {result.report['md']} (also {result.report['html'].name}, {result.report['csv'].name}, "
               f"{result.report['json'].name})")


@app.command("certs")
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for the certificates and keys.")],
    sites: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--sites", help="Site names: --sites A B C, --sites A,B,C or --sites A --sites B."),
    ] = None,
    more_sites: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(
            metavar="[SITES]...", help="More site names, as in --sites A B C.", show_default=False
        ),
    ] = None,
    hosts: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--host",
            help="IP or DNS name SuperNodes use to reach the SuperLink; repeat for several"
            " (default: the existing certificate's, else 127.0.0.1 and localhost).",
        ),
    ] = None,
    days: Annotated[int, typer.Option("--days", help="Validity of new certificates.")] = 365,
    force: Annotated[
        bool, typer.Option("--force", help="New CA, server certificate, signing key and listed sites' keys.")
    ] = False,
) -> None:
    """Make the TLS CA, SuperLink certificate, per-site SuperNode keys and model-signing key.

    Run again with only new site names to add sites: the CA and the other keys are kept.
    """
    from aldm_fed.federation.security import describe, make_certificates

    # Click options take one value each, so `--sites A B C` leaves B and C as arguments.
    names = _names([*(sites or []), *(more_sites or [])])
    try:
        result = make_certificates(out, names, hosts=hosts, days=days, force=force)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(describe(result))


@app.command("simulate")
def simulate(
    overrides: Overrides = None,
    no_progress: NoProgress = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also print Flower's own INFO lines (always in <fed.state>/flower.log).")
    ] = False,
) -> None:
    """Run the whole federated pipeline with every site simulated on this machine (Flower's
    simulation engine; the embedded phantom cohort is made at paths.cohort when there is none)."""
    from aldm_fed.federation.simulation import simulate as run_simulation
    from aldm_fed.federation.strategy import FederationError
    from aldm_fed.log import configure_logging

    configure_logging()
    try:
        status = run_simulation(_compose(overrides), progress=not no_progress, verbose=verbose)
    except FederationError as exc:
        _fail(str(exc), code=1)
    typer.echo(f"federated run done in {status['seconds']} s; sites {', '.join(status['sites'])}")
    typer.echo(f"report: {status['report']}")


# Mirrors aldm_fed.federation.superlink.DEFAULT_PORT (tests check) without importing it at startup.
SERVER_PORT = 8000


@app.command("server")
def server(
    overrides: Overrides = None,
    certs_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--certs", help="Folder made by `aldm-fed certs` (ca.crt, server.*, sites/*.pub)."),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on; 0.0.0.0 for all interfaces (then firewall the port to the"
            " sites: Flower's unauthenticated Control API shares it).",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="The SuperLink's port.")] = SERVER_PORT,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS and no SuperNode authentication (closed test networks).")
    ] = False,
) -> None:
    """Run the federation's server: start the SuperLink (TLS + SuperNode authentication), register
    the sites' keys, submit the run and stream it; exit 0 if the run completed, 1 if not."""
    from aldm_fed.federation.launch import run_server
    from aldm_fed.federation.processes import LaunchError, interrupt_on_sigterm

    cfg = _compose(overrides)
    try:
        with interrupt_on_sigterm():
            status = run_server(cfg, certs=certs_dir, host=host, port=port, insecure=insecure, echo=typer.echo)
    except LaunchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted: the run and the SuperLink were stopped", err=True)
        raise typer.Exit(130) from None
    if not status.ok:
        raise typer.Exit(1)


@app.command("client")
def client(
    site: Annotated[str, typer.Option("--site", help="This site's name (as in the certificates).")],
    data: Annotated[
        Path, typer.Option("--data", help="The site's cohort folder (case folders + manifests/<site>.json).")
    ],
    server_address: Annotated[
        str, typer.Option("--server", help="The SuperLink as HOST:PORT.")
    ] = f"127.0.0.1:{SERVER_PORT}",
    certs_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--certs", help="Folder with ca.crt and sites/<site>.key (or <site>.key)."),
    ] = None,
    ca: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--ca", help="The federation's CA certificate (instead of --certs)."),
    ] = None,
    key: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--key", help="This site's SuperNode private key (instead of --certs)."),
    ] = None,
    signing_pub: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--signing-pub", help="The server's model-signing public key (default with --certs:"
                     " DIR/signing.pub); global models it did not sign are refused."),
    ] = None,
    state: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--state", help="The site's state folder (default: ./aldm-fed-state/<site>)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, for a server started with --insecure.")
    ] = False,
    port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--port", help="The SuperNode's local Runtime API port (default: a free one)."),
    ] = None,
    max_wait: Annotated[
        float, typer.Option("--max-wait", help="Stop once the server has been unreachable this many seconds.")
    ] = 120.0,
    join_wait: Annotated[
        float,
        typer.Option("--join-wait", help="Keep retrying this many seconds while the server refuses to let"
                     " the site join (e.g. its key is not registered yet)."),
    ] = 600.0,
) -> None:
    """Join a federation as one site: run its SuperNode in the foreground until the server goes
    away (exit 0) or Ctrl-C."""
    from aldm_fed.federation.launch import run_client, signing_pub_file, site_files
    from aldm_fed.federation.processes import LaunchError, interrupt_on_sigterm

    if insecure and (certs_dir or ca or key):
        _fail("--insecure takes no certificates or keys (SuperNode authentication needs TLS)")
    if certs_dir is not None and (ca or key):
        _fail("give either --certs DIR or --ca FILE --key FILE, not both")
    if certs_dir is not None:
        ca, key = site_files(certs_dir, site)
        signing_pub = signing_pub or signing_pub_file(certs_dir)
    elif not insecure and (ca is None or key is None):
        _fail("TLS needs --ca FILE and --key FILE (or --certs DIR); --insecure only for an --insecure server")
    try:
        with interrupt_on_sigterm():
            code = run_client(
                site=site, data=data, server=server_address, state=state or Path("aldm-fed-state") / site,
                ca_cert=ca, private_key=key, insecure=insecure, signing_pub=signing_pub, port=port,
                max_wait_s=max_wait, join_wait_s=join_wait,
                echo=typer.echo,
            )
    except LaunchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the SuperNode of site {site} was stopped", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def _echo_result(title: str, result: dict) -> None:
    """Print a stage's summary: scalars in full, long lists as counts."""
    typer.echo(f"{title}: done")
    for key, value in result.items():
        if isinstance(value, (list, tuple)) and len(value) > 6:
            value = f"{len(value)} items"
        elif isinstance(value, dict) and len(value) > 12:
            value = f"{len(value)} entries"
        typer.echo(f"  {key}: {value}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point; turns expected errors into one clear line and exit code 2."""
    try:
        app(args=argv, prog_name="aldm-fed", standalone_mode=True)
    except (ValueError, KeyError, OSError) as exc:
        # OSError covers missing files, folders given for files, full disks: name the file. For a
        # rename (atomic writes) the user's path is the destination, filename2, not the temporary file.
        name = getattr(exc, "filename2", None) or getattr(exc, "filename", None)
        if isinstance(exc, FileExistsError | NotADirectoryError) and name and Path(name).is_file():
            message = f"{name}: is a file, a folder is expected here"
        elif isinstance(exc, OSError) and name and exc.strerror:
            message = f"{name}: {exc.strerror}"
        else:
            message = str(exc) if not name or str(name) in str(exc) else f"{name}: {exc}"
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except FloatingPointError as exc:  # training.numerics.NonFiniteError: names stage, step, override
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
