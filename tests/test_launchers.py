"""HCCL rank tables (hccl_tools, merge_hccl) and the launcher scripts' argument checking (no Ascend, no msrun run:
MF_LAUNCH_DRY_RUN=1 prints what would be started)."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from mindformers.core.context import init_context
from mindformers.tools import hccl_tools, merge_hccl
from mindformers.tools.hccl_tools import RankTableError, check_rank_table, read_hccn_conf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSRUN_LAUNCHER = os.path.join(REPO, 'scripts', 'msrun_launcher.sh')
RUN_DISTRIBUTE = os.path.join(REPO, 'scripts', 'run_distribute.sh')
CONFIG = 'configs/gpt2/run_gpt2_tiny.yaml'


def hccn_conf(path, devices=range(8), subnet=92):
    lines = ['# written by hccn_tool', 'netmask_0=255.255.255.0']
    lines += [f'address_{d} = 192.98.{subnet + d % 4}.{100 + d // 4}' for d in devices]
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def make_table(tmp_path, server_ip, *extra):
    conf = hccn_conf(tmp_path / f'hccn_{server_ip}.conf', subnet=10 * int(server_ip.rsplit('.', 1)[1]))
    assert hccl_tools.main(['--server_ip', server_ip, '--hccn_conf', conf, '--output_dir', str(tmp_path),
                            *extra]) == 0
    return tmp_path / f'hccl_8p_01234567_{server_ip}.json'


def bash(script, *args, dry_run=True, cwd=REPO):
    env = dict(os.environ, PYTHON=sys.executable)
    if dry_run:
        env['MF_LAUNCH_DRY_RUN'] = '1'
    return subprocess.run(['bash', script, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


# ---------------------------------------------------------------- rank tables
def test_rank_table_for_8_devices_on_one_node(tmp_path, capsys):
    path = make_table(tmp_path, '10.0.0.1')
    assert capsys.readouterr().out.strip() == str(path)
    table = json.loads(path.read_text())
    assert table == {
        'version': '1.0', 'server_count': '1', 'status': 'completed',
        'server_list': [{'server_id': '10.0.0.1', 'host_nic_ip': 'reserve', 'device': [
            {'device_id': str(d), 'device_ip': f'192.98.{10 + d % 4}.{100 + d // 4}', 'rank_id': str(d)}
            for d in range(8)]}]}


def test_visible_devices_and_given_device_ips(tmp_path):
    ips = [f'10.1.1.{i}' for i in range(4)]
    assert hccl_tools.main(['--device_num', '[0,4)', '--visible_devices', '4,5,6,7', '--server_ip', '10.0.0.1',
                            '--device_ips', ','.join(ips), '--hccn_conf', str(tmp_path / 'absent'),
                            '--output_dir', str(tmp_path)]) == 0
    table = json.loads((tmp_path / 'hccl_4p_4567_10.0.0.1.json').read_text())
    devices = table['server_list'][0]['device']
    assert [(d['device_id'], d['device_ip'], d['rank_id']) for d in devices] == \
        [(str(4 + i), ips[i], str(i)) for i in range(4)]


def test_two_nodes_of_8_merge_into_16_ranks(tmp_path, capsys):
    first, second = make_table(tmp_path, '10.0.0.1'), make_table(tmp_path, '10.0.0.2')
    capsys.readouterr()
    assert merge_hccl.main([str(first), str(second), '--output_dir', str(tmp_path)]) == 0
    merged_path = tmp_path / 'hccl_2s_16p.json'
    assert capsys.readouterr().out.strip() == str(merged_path)
    merged = json.loads(merged_path.read_text())
    assert merged['server_count'] == '2' and merged['status'] == 'completed'
    assert [s['server_id'] for s in merged['server_list']] == ['10.0.0.1', '10.0.0.2']
    second_devices = merged['server_list'][1]['device']
    assert [(d['device_id'], d['rank_id']) for d in second_devices] == [(str(i), str(8 + i)) for i in range(8)]
    assert second_devices[0]['device_ip'] == json.loads(second.read_text())['server_list'][0]['device'][0]['device_ip']
    assert len(check_rank_table(merged)) == 16


def test_merge_refuses_a_server_given_twice(tmp_path, capsys):
    first = make_table(tmp_path, '10.0.0.1')
    assert merge_hccl.main([str(first), str(first), '--output_dir', str(tmp_path)]) == 1
    assert 'server 10.0.0.1 is in both' in capsys.readouterr().err
    assert not (tmp_path / 'hccl_2s_16p.json').exists()


def test_server_ip_defaults_to_the_host_ip_but_never_loopback(tmp_path, monkeypatch, capsys):
    args = ['--device_num', '[0,1)', '--device_ips', '1.1.1.1', '--output_dir', str(tmp_path)]
    monkeypatch.setattr(hccl_tools, '_default_server_ip', lambda: '10.2.3.4')
    assert hccl_tools.main(args) == 0
    assert (tmp_path / 'hccl_1p_0_10.2.3.4.json').is_file()
    monkeypatch.setattr(hccl_tools, '_default_server_ip', lambda: '127.0.1.1')
    with pytest.raises(SystemExit) as exit_info:
        hccl_tools.main(args)
    assert exit_info.value.code == 2
    assert '--server_ip is required: this host\'s name resolves to 127.0.1.1' in capsys.readouterr().err


def test_hccn_conf_parsing(tmp_path):
    conf = tmp_path / 'hccn.conf'
    conf.write_text('address_0=192.168.100.101\nnetmask_0=255.255.255.0\n  address_3 = 192.168.103.101  \n'
                    'dscp_tc_0=1\n')
    assert read_hccn_conf(str(conf)) == {0: '192.168.100.101', 3: '192.168.103.101'}
    conf.write_text('address_0=192.168.100.101\naddress_1=192.168.300.1\n')
    with pytest.raises(RankTableError, match=r'hccn.conf line 2: .192.168.300.1. is not an IPv4 address'):
        read_hccn_conf(str(conf))


@pytest.mark.parametrize('device_num, needle', [
    ('[8,0)', 'is empty: start 8 must be less than end 0'),
    ('0,8', 'is not of the form'),
    ('[0,x)', 'is not of the form'),
    ('[0,9)', 'goes past the 8 visible device(s)'),
])
def test_bad_device_range_exits_2(tmp_path, capsys, device_num, needle):
    with pytest.raises(SystemExit) as exit_info:
        hccl_tools.main(['--device_num', device_num, '--server_ip', '10.0.0.1', '--device_ips', '1.1.1.1',
                         '--output_dir', str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith('hccl_tools: error: --device_num') and err.count('\n') == 1
    assert not list(tmp_path.iterdir())


def test_missing_device_ips_are_named(tmp_path, capsys):
    common = ['--server_ip', '10.0.0.1', '--output_dir', str(tmp_path)]
    assert hccl_tools.main([*common, '--hccn_conf', str(tmp_path / 'absent.conf')]) == 1
    assert 'no device IPs' in capsys.readouterr().err
    conf = hccn_conf(tmp_path / 'hccn.conf', devices=range(6))
    assert hccl_tools.main([*common, '--hccn_conf', conf]) == 1
    assert 'has no address_<id> line for device(s) 6, 7' in capsys.readouterr().err
    assert hccl_tools.main([*common, '--device_num', '[0,2)', '--device_ips', '1.1.1.1']) == 1
    assert '--device_ips has 1 address(es) but 2 device(s)' in capsys.readouterr().err
    assert not list(tmp_path.glob('hccl_*.json'))


@pytest.mark.parametrize('edit, needle', [
    (lambda t: t.update(status='initializing'), "status is 'initializing'"),
    (lambda t: t.update(server_count='2'), "server_count is '2' but server_list has 1"),
    (lambda t: t['server_list'][0]['device'][1].update(rank_id='0'), 'rank ids must be 0..7, each once'),
    (lambda t: t['server_list'][0]['device'][1].update(device_id='0'), 'device_id 0 appears twice'),
    (lambda t: t['server_list'][0]['device'][1].update(device_ip='192.98.10.100'), 'is also used by device 0'),
    (lambda t: t['server_list'][0]['device'][2].update(rank_id='two'), r'device\[2\].rank_id must be'),
])
def test_invalid_rank_tables_are_refused(tmp_path, edit, needle):
    table = json.loads(make_table(tmp_path, '10.0.0.1').read_text())
    edit(table)
    with pytest.raises(RankTableError, match=needle):
        check_rank_table(table)


# ---------------------------------------------------------------- run_distribute.sh
def plan_of(stdout):
    """[(RANK_ID, DEVICE_ID, RANK_SIZE, log file)] from run_distribute.sh's dry-run lines."""
    plan = []
    for line in stdout.strip().splitlines():
        words = shlex.split(line)
        env = dict(w.split('=', 1) for w in words if '=' in w and w.split('=', 1)[0].isupper())
        assert words[words.index('--use_parallel') + 1] == 'True'
        plan.append((int(env['RANK_ID']), int(env['DEVICE_ID']), int(env['RANK_SIZE']), words[-2]))
    return plan


def test_run_distribute_single_node(tmp_path):
    table = make_table(tmp_path, '10.0.0.1')
    result = bash(RUN_DISTRIBUTE, table, CONFIG, '[0,8)', 'train')
    assert result.returncode == 0, result.stderr
    assert plan_of(result.stdout) == [(i, i, 8, f'output/log/rank_{i}/worker.log') for i in range(8)]
    assert f'RANK_TABLE_FILE={table}' in result.stdout and f'--config {REPO}/{CONFIG}' in result.stdout


def test_run_distribute_part_of_a_node_and_predict_data(tmp_path):
    assert hccl_tools.main(['--device_num', '[0,4)', '--visible_devices', '4,5,6,7', '--server_ip', '10.0.0.1',
                            '--device_ips', '1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4', '--output_dir', str(tmp_path)]) == 0
    table = tmp_path / 'hccl_4p_4567_10.0.0.1.json'
    result = bash(RUN_DISTRIBUTE, table, CONFIG, '[4,8]', 'predict', 4, 'I love Beijing')
    assert result.returncode == 0, result.stderr
    assert [p[:3] for p in plan_of(result.stdout)] == [(i, 4 + i, 4) for i in range(4)]
    assert "--predict_data 'I love Beijing'" in result.stdout or '--predict_data I\\ love\\ Beijing' in result.stdout


def test_run_distribute_multi_node(tmp_path):
    tables = [make_table(tmp_path, ip) for ip in ('10.0.0.1', '10.0.0.2')]
    assert merge_hccl.main([*map(str, tables), '--output_dir', str(tmp_path)]) == 0
    merged = tmp_path / 'hccl_2s_16p.json'
    first, second = (bash(RUN_DISTRIBUTE, merged, CONFIG, rng, 'train', 16) for rng in ('[0,8)', '[8,16)'))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert [p[:3] for p in plan_of(first.stdout)] == [(i, i, 16) for i in range(8)]
    assert [p[:3] for p in plan_of(second.stdout)] == [(8 + i, i, 16) for i in range(8)]


@pytest.mark.parametrize('args, needle', [
    (['{absent}', CONFIG, '[0,8)', 'train'], "rank table file '{absent}' does not exist"),
    (['{bad_json}', CONFIG, '[0,8)', 'train'], 'is not valid JSON'),
    (['{table}', 'configs/none.yaml', '[0,8)', 'train'], "config file 'configs/none.yaml' does not exist"),
    (['{table}', CONFIG, '0-8', 'train'], "device range '0-8' is not of the form"),
    (['{table}', CONFIG, '[8,8)', 'train'], 'is empty: START (8) must be less than END (8)'),
    (['{table}', CONFIG, '[0,8)', 'serve'], "RUN_MODE must be train, finetune, eval or predict, got 'serve'"),
    (['{table}', CONFIG, '[0,4)', 'train'], 'starts 4 process(es) but the rank table has 8 device(s)'),
    (['{table}', CONFIG, '[0,8)', 'train', 'eight'], "RANK_SIZE must be a positive integer, got 'eight'"),
    (['{table}', CONFIG, '[0,8)', 'train', 4], 'RANK_SIZE (4) is smaller than the 8 process(es)'),
    (['{table}', CONFIG, '[0,8)', 'train', 16], "RANK_SIZE 16 differs from the rank table's 8 device(s)"),
    (['{table}', CONFIG, '[0,8)', 'train', 8, 'hello'], 'PREDICT_DATA is only for RUN_MODE predict'),
    (['{table}', CONFIG], 'expected 4 to 6 arguments'),
])
def test_run_distribute_argument_errors(tmp_path, args, needle):
    paths = {'absent': tmp_path / 'absent.json', 'bad_json': tmp_path / 'bad.json',
             'table': make_table(tmp_path, '10.0.0.1')}
    paths['bad_json'].write_text('{"server_list": [')
    args = [str(a).format(**paths) for a in args]
    result = bash(RUN_DISTRIBUTE, *args)
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.startswith('run_distribute.sh: error: ') and result.stderr.count('\n') == 1
    assert needle.format(**paths) in result.stderr, result.stderr


def test_run_distribute_refuses_one_range_over_two_servers(tmp_path):
    tables = []
    for server, devices in (('10.0.0.1', '0,1,2,3'), ('10.0.0.2', '4,5,6,7')):
        ips = ','.join(f'10.9.{server[-1]}.{d}' for d in devices.split(','))
        assert hccl_tools.main(['--device_num', '[0,4)', '--visible_devices', devices, '--server_ip', server,
                                '--device_ips', ips, '--output_dir', str(tmp_path)]) == 0
        tables.append(str(tmp_path / f"hccl_4p_{devices.replace(',', '')}_{server}.json"))
    assert merge_hccl.main([*tables, '--output_dir', str(tmp_path)]) == 0
    result = bash(RUN_DISTRIBUTE, tmp_path / 'hccl_2s_8p.json', CONFIG, '[0,8)', 'train')
    assert result.returncode == 1
    assert 'ranks 0..7 lie on several servers (10.0.0.1, 10.0.0.2)' in result.stderr, result.stderr


def test_run_distribute_without_ascend_says_to_use_msrun(tmp_path):
    result = bash(RUN_DISTRIBUTE, make_table(tmp_path, '10.0.0.1'), os.path.join(REPO, CONFIG), '[0,8)', 'train',
                  dry_run=False, cwd=tmp_path)
    assert result.returncode == 1 and 'need Ascend devices' in result.stderr and 'msrun_launcher.sh' in result.stderr
    assert not (tmp_path / 'output').exists()  # nothing was started


# ---------------------------------------------------------------- msrun_launcher.sh
def test_help_of_both_launchers():
    for script in (MSRUN_LAUNCHER, RUN_DISTRIBUTE):
        result = bash(script, '--help')
        assert result.returncode == 0 and result.stdout.startswith('Usage:') and 'MF_LAUNCH_DRY_RUN' in result.stdout


def test_msrun_launcher_defaults_and_command_splitting(tmp_path):
    command = f"python run_mindformer.py --config {CONFIG} --use_parallel True --predict_data 'a \"b\" $HOME'"
    result = bash(MSRUN_LAUNCHER, command)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        'msrun', '--worker_num=8', '--local_worker_num=8', '--master_addr=127.0.0.1', '--master_port=8118',
        '--node_rank=0', '--log_dir=output/msrun_log', '--join=False', '--cluster_time_out=7200',
        'run_mindformer.py', '--config', CONFIG, '--use_parallel', 'True', '--predict_data', 'a "b" $HOME']
    # node 1 of two 8-process nodes, from another directory: the script is found in the repository
    result = bash(MSRUN_LAUNCHER, 'run_mindformer.py --config gpt2_tiny', 16, 8, '192.168.1.1', 9000, 1, 'logs',
                  'true', -1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        'msrun', '--worker_num=16', '--local_worker_num=8', '--master_addr=192.168.1.1', '--master_port=9000',
        '--node_rank=1', '--log_dir=logs', '--join=True', '--cluster_time_out=-1',
        os.path.join(REPO, 'mindformers', 'tools', 'msrun_worker.py'), 'logs',  # records each worker's exit
        os.path.join(REPO, 'run_mindformer.py'), '--config', 'gpt2_tiny']


@pytest.mark.parametrize('args, needle', [
    ([], 'expected 1 to 9 arguments'),
    (['run_mindformer.py', 2, 2, '127.0.0.1', 8118, 0, 'log', 'True', 60, 'extra'], 'expected 1 to 9 arguments'),
    (['run_mindformer.py', 'two'], "WORKER_NUM must be a positive integer, got 'two'"),
    (['run_mindformer.py', 0], "WORKER_NUM must be a positive integer, got '0'"),
    (['run_mindformer.py', 2, 4], 'LOCAL_WORKER (4) must not exceed WORKER_NUM (2)'),
    (['run_mindformer.py', 2, 2, '127.0.0.1', 80], "MASTER_PORT must be an integer in 1024..65535, got '80'"),
    (['run_mindformer.py', 2, 2, '127.0.0.1', 70000], "MASTER_PORT must be an integer in 1024..65535"),
    (['run_mindformer.py', 2, 2, '127.0.0.1', 'port'], "MASTER_PORT must be an integer in 1024..65535"),
    (['run_mindformer.py', 16, 8, '10.0.0.1', 8118, 2], 'NODE_RANK (2) must be less than the number of nodes (2'),
    (['run_mindformer.py', 2, 2, '127.0.0.1', 8118, -1], "NODE_RANK must be a non-negative integer, got '-1'"),
    (['run_mindformer.py', 2, 2, '10.0.0.256'], "MASTER_ADDR '10.0.0.256' is not an IPv4 address"),
    (['run_mindformer.py', 2, 2, 'bad host!'], 'MASTER_ADDR must be an IP address or host name'),
    (['run_mindformer.py', 2, 2, '127.0.0.1', 8118, 0, 'log', 'yes'], "JOIN must be True or False, got 'yes'"),
    (['run_mindformer.py', 2, 2, '127.0.0.1', 8118, 0, 'log', 'True', '1h'], 'CLUSTER_TIME_OUT must be an integer'),
    (['python'], 'the command is empty'),
    (['train.py --config x'], "script 'train.py' of the command does not exist"),
    (['run_mindformer.py --config configs/gpt2/none.yaml'], "config file 'configs/gpt2/none.yaml' of the command "
                                                           "does not exist"),
    (['run_mindformer.py --config'], '--config in the command has no value'),
    (["run_mindformer.py --predict_data 'open"], 'cannot split the command: No closing quotation'),
])
def test_msrun_launcher_argument_errors(args, needle):
    result = bash(MSRUN_LAUNCHER, *args)
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.startswith('msrun_launcher.sh: error: ') and result.stderr.count('\n') == 1
    assert needle in result.stderr, result.stderr


def test_use_parallel_without_a_launcher_is_one_clear_error(monkeypatch):
    for name in ('MS_ROLE', 'RANK_TABLE_FILE', 'OMPI_COMM_WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match='not started by a distributed launcher.*msrun_launcher.sh'):
        init_context(use_parallel=True, context_config={'device_target': 'CPU'})


def test_msrun_workers_without_use_parallel_are_refused(monkeypatch):
    monkeypatch.setenv('MS_ROLE', 'MS_WORKER')
    monkeypatch.setenv('MS_WORKER_NUM', '2')
    with pytest.raises(RuntimeError, match='one of 2 msrun workers but use_parallel is False.*--use_parallel True'):
        init_context(use_parallel=False, context_config={'device_target': 'CPU'})
    monkeypatch.setenv('MS_WORKER_NUM', '1')
    assert init_context(use_parallel=False, context_config={'device_target': 'CPU'}) == (0, 1)
