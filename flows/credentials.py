"""Store credentials from a Prefect ``AwsCredentials`` block (prefect-aws), for the code a flow runs.

The block's keys go to :func:`maptools.maps.store.store_options` for the flow's own thread (and the tasks it
calls there); they never enter a map, a manifest, a flow parameter or a result. Without a block, the AWS
environment variables, profiles and roles apply. Dask workers of a sweep use their own environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import Field

from maptools.errors import DependencyError, SettingsError
from maptools.maps.store import store_options

__all__ = ["AwsCredentialsBlock", "aws_store_options", "credentials"]

#: The flows' ``aws_credentials`` parameter: the name of an AwsCredentials block document, never the keys.
AwsCredentialsBlock = Annotated[str | None, Field(description="A prefect-aws AwsCredentials block for an s3:// "
                                                              "output_root (default: the AWS environment).")]


def aws_store_options(block: str) -> dict[str, Any]:
    """s3fs options from the ``AwsCredentials`` block document named ``block``."""
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise DependencyError("aws_credentials names a prefect-aws block, and prefect-aws is not installed.",
                              "pip install 'maptools[store]' (or prefect-aws), or drop aws_credentials and set the "
                              "AWS environment variables.") from None
    try:
        creds = AwsCredentials.load(block)
    except ValueError as e:
        raise SettingsError(f"no AwsCredentials block named {block!r} ({e}).",
                            "create it (Prefect UI: Blocks, or AwsCredentials(...).save(NAME)) or fix the name.") \
            from None
    options: dict[str, Any] = {}
    if creds.aws_access_key_id:
        options["key"] = creds.aws_access_key_id
    if creds.aws_secret_access_key:
        options["secret"] = creds.aws_secret_access_key.get_secret_value()
    if creds.aws_session_token:
        options["token"] = creds.aws_session_token
    if creds.profile_name:
        options["profile"] = creds.profile_name
    if creds.region_name:
        options["client_kwargs"] = {"region_name": creds.region_name}
    if creds.aws_client_parameters.endpoint_url:
        options["endpoint_url"] = creds.aws_client_parameters.endpoint_url
    return options


@contextlib.contextmanager
def credentials(block: str | None) -> Iterator[None]:
    """Run the block's body with the credentials of ``block`` (nothing changes when it is None)."""
    if block is None:
        yield
        return
    with store_options(**aws_store_options(block)):
        yield
