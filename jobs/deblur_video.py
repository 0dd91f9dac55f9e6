"""`adarevd deblur-video INPUT OUTPUT`: videos in, deblurred videos out, in one resumable command.

Ingest (every video into frame shards), deblur (the Ray job, with every `deblur` option), then each
video assembled at its source's timing with its audio copied and its frame count checked
(`pipeline.videos`). A bad video is named and the others finish.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import PurePosixPath

from tqdm import tqdm

from adarevd.errors import InvalidInput
from jobs import deblur
from jobs.data import add_encoding_options, encoding_from
from pipeline import videos
from pipeline.assemble import AssembleError
from pipeline.ingest.run import INDEX_NAME, IngestConfig, ingest
from pipeline.store.storage import Store, parse_storage_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "deblur-video",
        help="deblur videos: a video file, folder or glob (any URL) in, deblurred videos with their audio out",
        description="Deblur every frame of each video under INPUT and write the videos to OUTPUT at their "
        "source timing, with their audio copied. A work folder (default beside OUTPUT) keeps each step: a "
        "re-run resumes. Takes every option of `adarevd deblur`.",
    )
    v.add_argument("input", nargs="+", help="video file(s), folder(s) or glob(s), local or any fsspec URL")
    v.add_argument(
        "output",
        help="a video file (for one input video; its suffix picks the container) or a folder (same names)",
    )
    v.add_argument("--work", help="work folder (default: OUTPUT.work for a file, OUTPUT/_work for a folder)")
    add_encoding_options(v)
    v.add_argument("--overwrite", action="store_true", help="replace output videos that exist")
    deblur.add_deblur_options(v)
    v.set_defaults(run=cmd_deblur_video)


def cmd_deblur_video(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_option)
    encoding = encoding_from(args)
    found = videos.plan(args.input, args.output, args.work, options)
    for job in found.videos:  # a codec the container cannot hold stops here, before any work
        encoding.options(encoding.codec_for(PurePosixPath(job.output)))
    model = deblur.load_checked(args)
    work = Store(found.work, options)
    videos.claim_work(work, found.videos)
    started = time.perf_counter()
    print(f"videos: {len(found.videos)} to {args.output}; work folder {found.work}")
    with tqdm(unit=" frames", desc="ingest", file=sys.stderr, disable=None) as bar:
        frames = work_store(work, "frames")
        if not frames.exists(INDEX_NAME):
            config = IngestConfig(overwrite=True, keep_audio=True)  # overwrite: shards of an ingest that stopped
            ingest([job.source for job in found.videos], frames, config, options=options, progress=bar.update)
        found_frames = videos.ingested(frames)
        ids, bad = found_frames.ids, found_frames.skipped
        if not ids:
            for source, why in bad.items():
                print(f"failed: {source}: {why}")
            raise InvalidInput(f"no frame of any video under {', '.join(args.input)} could be read")
        bar.set_description("deblur")
        deblurred = work_store(work, "deblurred")
        summary = None
        if not videos.all_finished(work, found.videos, ids):  # a re-run after the last video: no Ray
            summary = deblur.run_job(args, deblur.job_from(args, frames.url, deblurred.url), model, bar)
        bar.set_description("assemble")
        finished, failed = [], dict(bad)
        for job in found.videos:
            if job.source not in ids:
                failed.setdefault(job.source, "no frame was ingested")
                continue
            try:
                video_id = ids[job.source]
                how = videos.Assembly(
                    video_id=video_id,
                    frames=found_frames.frames[video_id],
                    audio=videos.audio_of(frames, job, video_id),
                    encoding=encoding,
                    overwrite=args.overwrite,
                )
                finished.append(videos.finish(deblurred, work, job, how))
            except (AssembleError, InvalidInput) as e:
                failed[job.source] = str(e)
                continue
            bar.total = (bar.total or 0) + finished[-1].frames
            bar.update(finished[-1].frames)
    for done in finished:
        state = "kept from the last run" if done.resumed else ("audio copied" if done.audio else "no audio")
        print(f"wrote {done.output}: {done.frames} frames ({state})")
    for source, why in failed.items():
        print(f"failed: {source}: {why}")
    for problem in found.skipped:
        print(f"skipped: {problem.source}: {problem.reason}")
    if summary is not None:
        deblur.print_summary(summary, deblurred.url, time.perf_counter() - started, standalone=False)
    print(f"videos: {len(finished)} written, {len(failed)} failed, {len(found.skipped)} inputs skipped")
    bad_frames = summary is not None and (summary.shard_errors or (summary.quarantined and not args.quarantine_ok))
    return 3 if failed or bad_frames else 0


def work_store(work: Store, name: str) -> Store:
    return Store(work.url_of(name), work.options, work.retry_seconds)
