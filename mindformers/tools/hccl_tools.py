"""HCCL rank tables (the JSON that `RANK_TABLE_FILE` names for a rank-table launch on Ascend).

Write one for this server:

    python -m mindformers.tools.hccl_tools --device_num "[0,8)" --server_ip 10.0.0.1 [--visible_devices 0,1,...,7]
        [--device_ips ip0,ip1,...] [--hccn_conf /etc/hccn.conf] [--output_dir .]

`--device_num [start,end)` selects positions in `--visible_devices` (default 0 .. device_num_per_node-1, so by default
the device ids start..end-1); "[0,8]" is read as [0,8) too, as MindFormers' scripts write it. Each device's IP comes
from `--device_ips` (in order), else from the `address_<device id>=<ip>` lines of hccn.conf. The table is written to
`<output_dir>/hccl_<n>p_<device ids>_<server ip>.json`; join the tables of several servers with
`python -m mindformers.tools.merge_hccl`.

Check a table against a launch and list its ranks (used by scripts/run_distribute.sh; one "RANK_ID DEVICE_ID" line
per process):

    python mindformers/tools/hccl_tools.py --check_rank_table hccl.json --device_num "[0,8)" [--rank_size 16]

It runs as a plain script too, without loading MindSpore (the library is `mindformers.parallel.rank_table`).
"""
import argparse
import os
import re
import socket
import sys

if __name__ == '__main__' and os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0]):
    # run by path (scripts/run_distribute.sh): import the package beside this checkout, not an installed one
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindformers.parallel.rank_table import (DEFAULT_HCCN_CONF, RankTableError, check_ip,  # noqa: E402,F401
                                             build_rank_table, check_rank_table, device_ips_for, load_rank_table,
                                             parse_device_range, plan_ranks, read_hccn_conf, write_rank_table)
from mindformers.tools.utils import OneLineArgumentParser, cli_error  # noqa: E402


def _default_server_ip():
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def build_parser():
    parser = OneLineArgumentParser(prog='hccl_tools', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device_num', default='[0,8)', help='device range "[start,end)" (default "[0,8)")')
    parser.add_argument('--visible_devices', help='comma-separated device ids the range indexes '
                                                  '(default 0,1,...,device_num_per_node-1)')
    parser.add_argument('--device_num_per_node', type=int, default=8, help='devices per server (default 8)')
    parser.add_argument('--server_ip', help="this server's IP (default: the IP of its host name)")
    parser.add_argument('--device_ips', help='comma-separated device IPs, one per selected device (default: read '
                                             'from --hccn_conf)')
    parser.add_argument('--hccn_conf', default=DEFAULT_HCCN_CONF, help=f'default {DEFAULT_HCCN_CONF}')
    parser.add_argument('--output_dir', default='.', help='where to write the table (default: current directory)')
    parser.add_argument('--check_rank_table', metavar='FILE', help='validate FILE for a launch of --device_num '
                                                                    '(and --rank_size) and print "RANK_ID DEVICE_ID" '
                                                                    'per process')
    parser.add_argument('--rank_size', type=int, help='with --check_rank_table: total ranks of a multi-node launch')
    return parser


def _selected_devices(args, parser):
    try:
        start, end = parse_device_range(args.device_num)
    except RankTableError as err:
        parser.error(f"--device_num: {err}")
    if args.visible_devices:
        items = [v.strip() for v in args.visible_devices.split(',')]
        if not all(re.fullmatch(r'\d+', v) for v in items):
            parser.error(f"--visible_devices must be comma-separated device ids, got {args.visible_devices!r}")
        visible = [int(v) for v in items]
        if len(set(visible)) != len(visible):
            parser.error(f"--visible_devices lists a device twice: {args.visible_devices}")
    else:
        if args.device_num_per_node < 1:
            parser.error(f"--device_num_per_node must be >= 1, got {args.device_num_per_node}")
        visible = list(range(args.device_num_per_node))
    if end > len(visible):
        parser.error(f"--device_num {args.device_num} goes past the {len(visible)} visible device(s) "
                     f"({','.join(map(str, visible))})")
    return visible[start:end]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.check_rank_table:
            try:
                start, end = parse_device_range(args.device_num)
            except RankTableError as err:
                parser.error(f"--device_num: {err}")
            if args.rank_size is not None and args.rank_size < 1:
                parser.error(f"--rank_size must be >= 1, got {args.rank_size}")
            _, devices = load_rank_table(args.check_rank_table)
            for rank_id, device_id in plan_ranks(devices, start, end, args.rank_size):
                print(rank_id, device_id)
            return 0
        device_ids = _selected_devices(args, parser)
        server_ip = args.server_ip or _default_server_ip()
        if not args.server_ip:
            if not server_ip or server_ip.startswith('127.'):
                parser.error(f"--server_ip is required: this host's name resolves to {server_ip or 'no address'}, "
                             f"which other servers cannot reach")
            sys.stderr.write(f"hccl_tools: no --server_ip, using {server_ip} (the IP of this host's name)\n")
        server_ip = check_ip(server_ip, '--server_ip')
        ips = [v.strip() for v in args.device_ips.split(',')] if args.device_ips else None
        table = build_rank_table(server_ip, device_ids, device_ips_for(device_ids, ips, args.hccn_conf))
        check_rank_table(table)
        path = write_rank_table(table, args.output_dir,
                                f"hccl_{len(device_ids)}p_{''.join(map(str, device_ids))}_{server_ip}.json")
    except (RankTableError, OSError) as err:
        return cli_error('hccl_tools', err, 1)
    print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
