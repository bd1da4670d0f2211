"""HCCL rank tables: the JSON that `RANK_TABLE_FILE` names for a rank-table launch on Ascend (one server's table
built from its devices and their IPs, several servers' tables merged, a table checked against a launch and its
ranks planned). The command lines are `mindformers/tools/hccl_tools.py` and `merge_hccl.py`. Standard library
only (with `import mindformers` lazy, the launch scripts call it without loading MindSpore)."""
import ipaddress
import json
import os
import re

from mindformers.tools.file_io import write_json_atomic

DEFAULT_HCCN_CONF = '/etc/hccn.conf'
_RANGE = re.compile(r'^\s*\[\s*(\d+)\s*,\s*(\d+)\s*[)\]]\s*$')


class RankTableError(ValueError):
    """A rank table, hccn.conf or device selection that cannot work; the message names the file and entry."""


def parse_device_range(text):
    """`"[start,end)"` (or MindFormers' `"[start,end]"`, also end-exclusive) -> (start, end) with start < end."""
    match = _RANGE.match(str(text))
    if not match:
        raise RankTableError(f"device range {text!r} is not of the form \"[start,end)\", e.g. \"[0,8)\"")
    start, end = int(match.group(1)), int(match.group(2))
    if start >= end:
        raise RankTableError(f"device range {text!r} is empty: start {start} must be less than end {end}")
    return start, end


def check_ip(ip, where):
    """`ip` as a normalized IPv4 address string; RankTableError naming `where` otherwise."""
    try:
        return str(ipaddress.IPv4Address(str(ip).strip()))
    except ValueError:
        raise RankTableError(f"{where}: {ip!r} is not an IPv4 address") from None


def read_hccn_conf(path=DEFAULT_HCCN_CONF):
    """{device id: device IP} from the `address_<id>=<ip>` lines of an hccn.conf."""
    addresses = {}
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            match = re.match(r'^\s*address_(\d+)\s*=\s*(\S+)\s*$', line)
            if match:
                addresses[int(match.group(1))] = check_ip(match.group(2), f"{path} line {number}")
    return addresses


def device_ips_for(device_ids, device_ips=None, hccn_conf=DEFAULT_HCCN_CONF):
    """The IP of each of `device_ids`: from `device_ips` (a list in the same order) when given, else hccn.conf."""
    if device_ips:
        if len(device_ips) != len(device_ids):
            raise RankTableError(f"--device_ips has {len(device_ips)} address(es) but {len(device_ids)} device(s) "
                                 f"are selected ({', '.join(map(str, device_ids))}); give one per device, in order")
        return [check_ip(ip, '--device_ips') for ip in device_ips]
    if not os.path.isfile(hccn_conf):
        raise RankTableError(f"no device IPs: {hccn_conf} does not exist; give them with --device_ips ip0,ip1,... "
                             f"(one per device, in order) or point --hccn_conf at the file")
    known = read_hccn_conf(hccn_conf)
    missing = [d for d in device_ids if d not in known]
    if missing:
        raise RankTableError(f"{hccn_conf} has no address_<id> line for device(s) {', '.join(map(str, missing))}; "
                             f"fix it (hccn_tool -i <id> -ip -g shows a device's IP) or give --device_ips")
    return [known[d] for d in device_ids]


def build_rank_table(server_ip, device_ids, device_ips):
    """A one-server rank table: ranks 0..n-1 on `device_ids` in order. Ids and ranks are strings, as HCCL reads."""
    devices = [{'device_id': str(d), 'device_ip': ip, 'rank_id': str(rank)}
               for rank, (d, ip) in enumerate(zip(device_ids, device_ips))]
    return {'version': '1.0', 'server_count': '1',
            'server_list': [{'server_id': server_ip, 'device': devices, 'host_nic_ip': 'reserve'}],
            'status': 'completed'}


def _int_field(value, where):
    if isinstance(value, bool) or not re.fullmatch(r'\d+', str(value)):
        raise RankTableError(f"{where} must be a non-negative integer (as a string), got {value!r}")
    return int(value)


def check_rank_table(table, where='rank table'):
    """Validate a rank table; returns its devices ordered by rank: dicts with rank_id, device_id (ints), device_ip
    and server_id. Ranks must be 0..n-1 once each; server ids, devices within a server and device IPs unique."""
    if not isinstance(table, dict) or not isinstance(table.get('server_list'), list) or not table['server_list']:
        raise RankTableError(f"{where}: expected an object with a non-empty server_list")
    if table.get('status') != 'completed':
        raise RankTableError(f"{where}: status is {table.get('status')!r}; HCCL reads only tables with status "
                             f"\"completed\"")
    servers = table['server_list']
    if str(table.get('server_count')) != str(len(servers)):
        raise RankTableError(f"{where}: server_count is {table.get('server_count')!r} but server_list has "
                             f"{len(servers)} server(s)")
    devices, server_ids, ips = [], set(), {}
    for s, server in enumerate(servers):
        here = f"{where}: server_list[{s}]"
        if not isinstance(server, dict) or not server.get('server_id') or not isinstance(server.get('device'), list) \
                or not server['device']:
            raise RankTableError(f"{here} needs a server_id and a non-empty device list")
        server_id = str(server['server_id'])
        if server_id in server_ids:
            raise RankTableError(f"{here}: server_id {server_id} appears twice")
        server_ids.add(server_id)
        seen = set()
        for d, device in enumerate(server['device']):
            at = f"{here}.device[{d}]"
            if not isinstance(device, dict):
                raise RankTableError(f"{at} must be an object with device_id, device_ip and rank_id")
            entry = {'server_id': server_id,
                     'device_id': _int_field(device.get('device_id'), f"{at}.device_id"),
                     'rank_id': _int_field(device.get('rank_id'), f"{at}.rank_id"),
                     'device_ip': check_ip(device.get('device_ip'), f"{at}.device_ip")}
            if entry['device_id'] in seen:
                raise RankTableError(f"{at}: device_id {entry['device_id']} appears twice on server {server_id}")
            seen.add(entry['device_id'])
            if entry['device_ip'] in ips:
                raise RankTableError(f"{at}: device_ip {entry['device_ip']} is also used by {ips[entry['device_ip']]}")
            ips[entry['device_ip']] = f"device {entry['device_id']} of server {server_id}"
            devices.append(entry)
    devices.sort(key=lambda e: e['rank_id'])
    ranks = [e['rank_id'] for e in devices]
    if ranks != list(range(len(devices))):
        raise RankTableError(f"{where}: rank ids must be 0..{len(devices) - 1}, each once; found {ranks}")
    return devices


def load_rank_table(path):
    """Read and validate a rank-table file; returns (table, devices by rank)."""
    if not os.path.isfile(path):
        raise RankTableError(f"rank table {path} does not exist")
    try:
        with open(path, encoding='utf-8') as f:
            table = json.load(f)
    except json.JSONDecodeError as err:
        raise RankTableError(f"rank table {path} is not valid JSON ({err})") from None
    return table, check_rank_table(table, where=f"rank table {path}")


def plan_ranks(devices, start, end, rank_size=None):
    """[(RANK_ID, DEVICE_ID)] of the processes one node starts for global range [start, end) of a rank table.

    Single node (`rank_size` None): the table must have end - start devices; RANK_ID = i - start, DEVICE_ID = i.
    Multi node: `rank_size` must be the table's device count; RANK_ID = i, DEVICE_ID = i - start. Either way the
    table must put each rank on that device, and a node's ranks on one server."""
    total = len(devices)
    if rank_size is None:
        if end - start != total:
            raise RankTableError(f"device range [{start},{end}) starts {end - start} process(es) but the rank table "
                                 f"has {total} device(s); for a multi-node launch also pass RANK_SIZE={total}")
        plan = [(i - start, i) for i in range(start, end)]
    else:
        if rank_size != total:
            raise RankTableError(f"RANK_SIZE {rank_size} differs from the rank table's {total} device(s)")
        if end > rank_size:
            raise RankTableError(f"device range [{start},{end}) goes past RANK_SIZE {rank_size}: a node's range is "
                                 f"its global ranks, e.g. [8,16) for the second of two 8-device nodes")
        plan = [(i, i - start) for i in range(start, end)]
    for rank_id, device_id in plan:
        entry = devices[rank_id]
        if entry['device_id'] != device_id:
            raise RankTableError(f"the rank table puts rank {rank_id} on device {entry['device_id']} of server "
                                 f"{entry['server_id']}, but range [{start},{end}) would start it on DEVICE_ID "
                                 f"{device_id}")
    servers = {devices[rank_id]['server_id'] for rank_id, _ in plan}
    if len(servers) > 1:
        raise RankTableError(f"ranks {plan[0][0]}..{plan[-1][0]} lie on several servers "
                             f"({', '.join(sorted(servers))}); launch each server's range on that server")
    return plan


def write_rank_table(table, output_dir, name):
    """Write `table` to `<output_dir>/<name>` atomically; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    return write_json_atomic(os.path.join(output_dir, name), table, indent=4)


def merge_rank_tables(tables):
    """One validated rank table from `tables` (list of (name, table)), ranks renumbered in server order."""
    servers = []
    owner = {}
    for name, table in tables:
        for server in table['server_list']:
            server_id = str(server['server_id'])
            if server_id in owner:
                raise RankTableError(f"server {server_id} is in both {owner[server_id]} and {name}; each server's "
                                     f"table must be given once")
            owner[server_id] = name
            servers.append(server)
    merged_servers, rank = [], 0
    for server in servers:
        devices = []
        for device in sorted(server['device'], key=lambda d: int(d['rank_id'])):
            devices.append({'device_id': str(device['device_id']), 'device_ip': device['device_ip'],
                            'rank_id': str(rank)})
            rank += 1
        merged_servers.append({'server_id': str(server['server_id']), 'device': devices,
                               'host_nic_ip': server.get('host_nic_ip', 'reserve')})
    merged = {'version': '1.0', 'server_count': str(len(merged_servers)), 'server_list': merged_servers,
              'status': 'completed'}
    check_rank_table(merged, where='merged rank table')
    return merged
