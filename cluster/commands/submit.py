"""attribution submit / attribution job: run presets as Ray jobs on a cluster."""

from __future__ import annotations

import os
import sys

from cluster.storage import is_uri


def submit_command(args) -> int:
    from attribution.presets import load_preset, parse_override
    from attribution.stages import parse_settings, select_stages
    from cluster import submit as jobs

    # Fail here, not on the cluster after the upload: unknown preset, bad --set, unknown stage.
    try:
        parse_settings(load_preset(args.preset, dict(parse_override(o) for o in args.overrides),
                                   ablation=args.ablation))
        if args.stages:
            select_stages(args.stages)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    exp = args.exp or (f"runs/{os.path.splitext(os.path.basename(args.preset))[0]}"
                       + (f"-{args.ablation}" if args.ablation else ""))
    if not is_uri(exp):
        # The job runs in a temporary working_dir on the head node: pass an absolute path.
        exp = os.path.abspath(exp)
    try:
        job_id = jobs.submit(args.address, args.preset, exp, overrides=args.overrides,
                             stages=args.stages.split(",") if args.stages else None,
                             ship_project=not args.installed, job_id=args.job_id, ablation=args.ablation)
    except jobs.SubmissionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id} (preset {args.preset}, experiment {exp})")
    print(f"  status: attribution job status {job_id} --address {args.address}")
    print(f"  stop:   attribution job stop {job_id} --address {args.address}")
    if args.no_follow:
        return 0
    status = jobs.follow(args.address, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def job_command(args) -> int:
    from cluster import submit as jobs

    try:
        client = jobs.job_client(args.address)
    except jobs.SubmissionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.action != "list" and not args.job_id:
        print(f"error: 'attribution job {args.action}' needs a JOB_ID (see 'attribution job list')", file=sys.stderr)
        return 2
    if args.action == "list":
        for info in client.list_jobs():
            print(f"{info.submission_id}\t{info.status.value}\t{info.entrypoint}")
    elif args.action == "status":
        print(client.get_job_status(args.job_id).value)
    elif args.action == "logs":
        if args.follow:
            print(f"job {args.job_id}: {jobs.follow(args.address, args.job_id)}")
        else:
            print(client.get_job_logs(args.job_id), end="")
    elif args.action == "stop":
        print("stopped" if client.stop_job(args.job_id) else "not running")
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "submit", help="submit a preset as a Ray job to a cluster",
        description="Submit a preset to a Ray cluster through the Ray Jobs API and stream its logs. "
        "With token authentication (Ray >= 2.52), the cluster's token must be in ~/.ray/auth_token "
        "(or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN); RAY_AUTH_MODE=token is then set for you.")
    parser.add_argument("preset", help="preset name (quickstart, cifar10, imagenet) or a local .toml file "
                        "(sent with the job: the cluster need not see the file)")
    parser.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    parser.add_argument("--exp", default=None,
                        help="experiment directory: a path the head node sees, or a URI (s3://, gs://, file://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages")
    parser.add_argument("--ablation", default=None, metavar="NAME",
                        help="an ablation from attribution/presets/ablations.toml, applied on the cluster")
    parser.add_argument("--job-id", default=None, help="submission id (default: generated)")
    parser.add_argument("--installed", action="store_true",
                        help="the cluster image has this project installed: do not upload the source")
    parser.add_argument("--no-follow", action="store_true", help="return after submitting")
    parser.set_defaults(func=submit_command)

    job = subparsers.add_parser("job", help="list, inspect, follow or stop submitted jobs",
                                description="Manage Ray jobs submitted with 'attribution submit'.")
    job.add_argument("action", choices=["list", "status", "logs", "stop"])
    job.add_argument("job_id", nargs="?", default=None)
    job.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    job.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    job.set_defaults(func=job_command)
