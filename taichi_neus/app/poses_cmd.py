"""``taichi-neus poses --images DIR --out SCENE``: camera poses from photographs (COLMAP via pycolmap).

Registered by :mod:`taichi_neus.app.cli`; the work is :func:`taichi_neus.data.sfm.poses_from_photos`.
"""

from taichi_neus.data.sfm import EXHAUSTIVE_MAX, MAX_FEATURES, MAX_IMAGE_SIZE


def add_parser(sub) -> None:
    """Add the ``poses`` subcommand to the CLI's subparsers."""
    po = sub.add_parser("poses", help="camera poses from a folder of photographs (COLMAP); writes a scene for --data")
    po.add_argument("--images", required=True, help="folder of photographs of one object (one camera, one size)")
    po.add_argument("--out", required=True, help="scene folder to create (refused if it exists)")
    po.add_argument("--masks", default="", help="optional folder with one mask per photograph (<name>.png)")
    po.add_argument("--matcher", default="auto", choices=("auto", "exhaustive", "sequential"),
                    help=f"pairs to match: all (up to {EXHAUSTIVE_MAX} photographs, auto) or neighbours in name "
                         "order (sequential: video frames, long captures)")
    po.add_argument("--max-image-size", type=int, default=MAX_IMAGE_SIZE,
                    help="long side SIFT sees, pixels (smaller registers fewer photographs)")
    po.add_argument("--max-features", type=int, default=MAX_FEATURES,
                    help="SIFT keypoints per photograph (fewer: faster matching, less accurate poses)")
    po.add_argument("--seed", type=int, default=0, help="COLMAP's random seed")
    po.add_argument("--verbose", action="store_true", help="show COLMAP's own log")


def run(args) -> int:
    from taichi_neus.data.sfm import poses_from_photos
    from taichi_neus.errors import UserInputError

    for name in ("max_image_size", "max_features"):
        if getattr(args, name) <= 0:
            raise UserInputError(f"--{name.replace('_', '-')} must be a positive number of "
                                 f"{'pixels' if name == 'max_image_size' else 'features'}, got {getattr(args, name)}.")
    poses_from_photos(args.images, args.out, masks=args.masks or None, matcher=args.matcher,
                      max_image_size=args.max_image_size,
                      max_features=args.max_features, seed=args.seed, verbose=args.verbose)
    print(f"[poses] wrote {args.out}; train with: taichi-neus train --data {args.out} --out runs/NAME")
    return 0
