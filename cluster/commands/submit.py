"""attribution submit / attribution job: run presets as Ray jobs on a cluster."""

from __future__ import annotations

import argparse
import os

from cluster.storage import is_uri


def submit_command(args) -> int:
    from cluster import submit as jobs
    from cluster.commands.run import checked_preset, default_exp

    # Fail here, not on the cluster after the upload: the same checks as 'attribution run'.
    _, stages = checked_preset(args.preset, args.overrides, args.ablation, args.stages)
    exp = args.exp or default_exp(os.path.splitext(os.path.basename(args.preset))[0], args.ablation)
    if not is_uri(exp):
        # The job runs in a temporary working_dir on the head node: pass an absolute path.
        exp = os.path.abspath(exp)
    try:
        job_id = jobs.submit(args.address, args.preset, exp, overrides=args.overrides, stages=stages,
                             ship_project=not args.installed, job_id=args.job_id, ablation=args.ablation,
                             entrypoint_num_gpus=args.driver_gpus)
    except jobs.SubmissionError:
        raise
    except RuntimeError as error:  # the Jobs API's refusals, e.g. a --job-id already taken
        raise jobs.SubmissionError(f"the Ray cluster at {args.address} refused the job: "
                                   f"{str(error).splitlines()[0]}") from error
    print(f"submitted job {job_id} (preset {args.preset}, experiment {exp})")
    print(f"  status: attribution job status {job_id} --address {args.address}")
    print(f"  stop:   attribution job stop {job_id} --address {args.address}")
    if args.no_follow:
        return 0
    status = jobs.follow(args.address, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def lookup_error(error: Exception, job_id: str, address: str) -> Exception:
    """The Jobs API's answer about ``job_id`` as the project's error: an unknown id (Ray:
    "Request failed with status code 404: Job ... does not exist") names the command that
    lists the jobs; other refusals keep Ray's first line."""
    from cluster.submit import SubmissionError

    text = str(error)
    if "does not exist" in text or "status code 404" in text:
        return SubmissionError(f"no job {job_id!r} on the cluster at {address}: list the submitted jobs with "
                               f"'attribution job list --address {address}'")
    return SubmissionError(f"the Ray cluster at {address} could not answer about job {job_id!r}: "
                           f"{text.splitlines()[0] if text else type(error).__name__}")


def job_command(args) -> int:
    from cluster import submit as jobs

    address = args.address
    if not address:
        from attribution.settings import SettingsError

        raise SettingsError(f"'attribution job {args.action}' needs the cluster's dashboard address: "
                            "--address http://HEAD:8265")
    client = jobs.job_client(address)
    if args.action == "list":
        for info in client.list_jobs():
            print(f"{info.submission_id}\t{info.status.value}\t{info.entrypoint}")
        return 0
    try:
        if args.action == "status":
            print(client.get_job_status(args.job_id).value)
        elif args.action == "logs" and args.follow:
            print(f"job {args.job_id}: {jobs.follow(address, args.job_id)}")
        elif args.action == "logs":
            print(client.get_job_logs(args.job_id), end="")
        elif args.action == "stop":
            print("stopped" if client.stop_job(args.job_id) else "not running")
    except jobs.SubmissionError:
        raise
    except RuntimeError as error:  # the Jobs API's refusals (unknown id, ...) are RuntimeErrors
        raise lookup_error(error, args.job_id, address) from error
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
    parser.add_argument("--driver-gpus", type=float, default=0.0,
                        help="GPUs the job's driver reserves (default 0); 1 when TRAK fans out over GPU workers "
                             "(trak.actors != 1): the driver finalizes and scores with the workers' projection")
    parser.add_argument("--installed", action="store_true",
                        help="the cluster image has this project installed: do not upload the source")
    parser.add_argument("--no-follow", action="store_true", help="return after submitting")
    parser.set_defaults(func=submit_command)

    job = subparsers.add_parser("job", help="list, inspect, follow or stop submitted jobs",
                                description="Manage Ray jobs submitted with 'attribution submit'.")
    address_help = "Ray dashboard address, e.g. http://HEAD:8265"
    job.add_argument("--address", default=None, help=address_help)
    # One parser per action, so each takes its own flags in any order (job logs --follow ID);
    # --address before or after the action (SUPPRESS keeps the one given before).
    actions = job.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (("list", "the submitted jobs"), ("status", "a job's status"),
                              ("logs", "a job's logs (--follow: stream until it ends)"), ("stop", "stop a job")):
        sub = actions.add_parser(action, help=help_text, description=f"attribution job {action}: {help_text}.")
        if action != "list":
            sub.add_argument("job_id", metavar="JOB_ID", help="the submission id ('attribution job list')")
        if action == "logs":
            sub.add_argument("--follow", action="store_true", help="stream until the job ends")
        sub.add_argument("--address", default=argparse.SUPPRESS, help=address_help)
        sub.set_defaults(func=job_command)
