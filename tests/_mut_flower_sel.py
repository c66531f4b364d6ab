"""A selection of tests/test_flower.py for mutation runs (not collected by pytest)."""
import pytest
import test_flower as tf
from test_flower import tiny_clip  # noqa: F401


@pytest.mark.parametrize("name", ["fedal", "fedal_sampled", "fedal_faults", "fedbn_holdout", "dp",
                                  "clip_svm"])
def test_parity(tmp_path, tiny_clip, name):  # noqa: F811
    tf.test_every_method_on_flower_ends_as_run_py(tmp_path, tiny_clip, name)


def test_fcu(tmp_path):
    tf.test_fcu_on_flower_ends_as_run_py(tmp_path)


def test_fcu_resume(tmp_path, capsys):
    tf.test_fcu_on_flower_stopped_in_its_original_run_and_resumed_ends_as_run_py(tmp_path, capsys)


def test_pga_state(tmp_path, capsys):
    tf.test_pga_on_flower_needs_u_s_state_of_the_original_run(tmp_path, capsys)


def test_fedal_resume(tmp_path, capsys):
    tf.test_fedal_stopped_mid_acquisition_phase_and_resumed_on_shared_nodes_ends_as_run_py(
        tmp_path, capsys)


@pytest.mark.parametrize("name", sorted(tf.NOT_ON_FLOWER))
def test_refused(tmp_path, tiny_clip, capsys, name):  # noqa: F811
    tf.test_methods_that_read_a_client_s_data_elsewhere_are_refused_on_flower(
        tmp_path, tiny_clip, capsys, name)


def test_registry():
    tf.test_every_registered_method_is_either_checked_on_flower_or_refused()




def test_lost(tmp_path):
    tf.test_a_lost_client_is_logged_and_the_round_completes_with_the_others(tmp_path)


def test_counters(tmp_path):
    tf.test_the_flower_byte_and_second_counters_add_up_every_message(tmp_path)


def test_two_nodes(tmp_path, capsys):
    tf.test_two_nodes_that_claim_one_client_before_round_1_fail_in_one_line(tmp_path, capsys)


def test_late(tmp_path):
    tf.test_a_held_out_client_s_node_that_joins_late_is_waited_for(tmp_path)


@pytest.mark.parametrize("where,needle", [("server", "client site1's state on the server"),
                                          ("node", "on the node of client site0")])
def test_elsewhere(tmp_path, capsys, monkeypatch, where, needle):
    tf.test_a_method_that_reads_a_client_s_state_where_it_is_not_fails_in_one_line(
        tmp_path, capsys, monkeypatch, where, needle)


def test_shared_process(tmp_path):
    tf.test_nodes_sharing_one_process_end_as_run_py(tmp_path)


def test_isic(tmp_path):
    tf.test_isic_sites_holding_only_their_own_images_and_a_server_with_none_end_as_run_py(
        tmp_path, "--algo fedavg --bn local")


def test_nan_private(tmp_path, capsys, monkeypatch):
    tf.test_a_private_tensor_that_goes_nan_on_a_node_stops_the_run_in_one_line(
        tmp_path, capsys, monkeypatch)


def test_missing_folder(tmp_path, capsys):
    tf.test_a_node_whose_data_folder_is_missing_fails_in_one_line(tmp_path, capsys)


def test_wait_rejoin(tmp_path):
    tf.test_on_dropout_wait_sends_again_to_the_node_that_comes_back_and_ends_as_run_py(
        tmp_path, "train", 2)


def test_isic_shared_folder(tmp_path):
    tf.test_isic_nodes_without_a_data_dir_read_the_run_s_folder(tmp_path)


def test_two_down(tmp_path, monkeypatch):
    tf.test_a_step_two_wrappers_down_runs_on_the_nodes(tmp_path, monkeypatch)


def test_second_node(tmp_path):
    tf.test_a_second_node_for_a_client_after_round_1_replaces_the_first(tmp_path)
