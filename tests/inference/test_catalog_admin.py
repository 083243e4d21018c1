"""The model catalog in the Django admin: a chat template is checked when staff save it."""

from __future__ import annotations

import pytest
from django.forms.models import model_to_dict

from inference.apis import render_chat
from inference.models import CatalogModel
from tests.helpers import served_model

pytestmark = pytest.mark.django_db

GOOD = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def save_template(admin_client, model: CatalogModel, template: str):
    form = {k: ("" if v is None else v) for k, v in model_to_dict(model).items()}
    return admin_client.post(
        f"/admin/inference/catalogmodel/{model.pk}/change/", {**form, "chat_template": template}
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[0].content }}",  # Jinja's subscript, not Django's
        "{% for m in messages %}{{ m.content }}",  # unclosed tag
        "{% for m in messages %}{{ m.content|tojson }}{% endfor %}",  # no such filter
        '{% include "chat.txt" %}',  # compiles, fails when rendered
    ],
)
def test_a_chat_template_that_does_not_render_is_refused_and_the_old_one_kept(
    admin_client, template
):
    # given a served model with a working template
    model = served_model("gym-template", chat_template=GOOD)

    # when staff save a template the API could not render
    response = save_template(admin_client, model, template)

    # then the form names the field, and chat requests still render the old one
    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == ["chat_template"]
    model.refresh_from_db()
    assert model.chat_template == GOOD
    assert render_chat(model, [{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"


def test_a_chat_template_that_renders_is_saved(admin_client):
    # given a served model
    model = served_model("gym-template")

    # when staff save another working template
    response = save_template(
        admin_client, model, "{% for m in messages %}{{ m.content }}{% endfor %}"
    )

    # then it is saved and used
    assert response.status_code == 302
    model.refresh_from_db()
    assert render_chat(model, [{"role": "user", "content": "hi"}]) == "hi"
