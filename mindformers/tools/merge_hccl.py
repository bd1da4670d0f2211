"""Join the HCCL rank tables of several servers into one for a multi-node launch.

    python -m mindformers.tools.merge_hccl hccl_8p_01234567_10.0.0.1.json hccl_8p_01234567_10.0.0.2.json
        [--output_dir .]

Servers keep the order of the arguments (the first file's devices become ranks 0..n-1, the next file's follow);
rank ids are renumbered, server_count is the number of servers. A server id or device IP that appears twice is an
error. Writes `<output_dir>/hccl_<servers>s_<ranks>p.json` and prints its path; give the same file to every node.
"""
import argparse
import sys

from mindformers.tools.utils import cli_error
from mindformers.parallel.rank_table import RankTableError, load_rank_table, merge_rank_tables, write_rank_table


def main(argv=None):
    parser = argparse.ArgumentParser(prog='merge_hccl', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('files', nargs='+', metavar='RANK_TABLE', help='rank tables of the servers, in order')
    parser.add_argument('--output_dir', default='.', help='where to write the merged table (default: current '
                                                          'directory)')
    args = parser.parse_args(argv)
    if len(args.files) < 2:
        parser.error("give the rank tables of at least two servers")
    try:
        tables = [(path, load_rank_table(path)[0]) for path in args.files]
        merged = merge_rank_tables(tables)
        ranks = sum(len(s['device']) for s in merged['server_list'])
        path = write_rank_table(merged, args.output_dir, f"hccl_{merged['server_count']}s_{ranks}p.json")
    except (RankTableError, OSError) as err:
        return cli_error('merge_hccl', err, 1)
    print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
